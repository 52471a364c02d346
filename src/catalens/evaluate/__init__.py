"""catalens.evaluate"""

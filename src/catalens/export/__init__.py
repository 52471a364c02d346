"""catalens.export"""

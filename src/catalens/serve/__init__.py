"""catalens.serve"""

"""catalens.heads"""

"""catalens.predict"""

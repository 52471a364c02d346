"""catalens"""

"""catalens.train"""

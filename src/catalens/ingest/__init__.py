"""catalens.ingest"""

"""Backbones, the embedding cache and the streaming engine that feeds them."""

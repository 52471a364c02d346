"""The inference core: the model folder format, loading, and the one decoder.

- :mod:`catalens.model.format`  the folder's files and its typed description (model.json)
- :mod:`catalens.model.load`    ``load_model(folder)`` → single model or ensemble, validated
- :mod:`catalens.model.decode`  probabilities (+ titles) → answers (fusion, hierarchy, top-k, tags)
- :mod:`catalens.model.predictor`  ``Predictor.predict(x)`` for paths, folders, globs, tables,
  DataFrames, PIL images, bytes and arrays (what ``catalens.load`` returns)
- :mod:`catalens.model.single`, :mod:`~catalens.model.ensemble`, :mod:`~catalens.model.tta`

Names resolve lazily: ``import catalens.model`` does not import torch.
"""
from __future__ import annotations

import importlib

_API = {"load_model": "catalens.model.load", "Decoder": "catalens.model.decode",
        "read_description": "catalens.model.format", "ModelDescription": "catalens.model.format",
        "ModelError": "catalens.model.format", "Predictor": "catalens.model.predictor",
        "load": "catalens.model.predictor"}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'catalens.model' has no attribute {name!r}")

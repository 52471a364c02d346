"""Task heads over backbone features, shaped like scikit-learn estimators.

Names resolve lazily, so the numpy-only parts (:mod:`catalens.heads.hierarchy`, used by the
decoder) import without torch.
"""
from __future__ import annotations

import importlib

__all__ = ["HEADS", "MultiTaskHead", "create_head", "head_from_config"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("catalens.heads.estimator"), name)
    raise AttributeError(f"module 'catalens.heads' has no attribute {name!r}")

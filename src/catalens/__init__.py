"""catalens: product photos to categories and tags.

The library API behind the CLI, imported lazily (``import catalens`` stays cheap)::

    import catalens

    cfg = catalens.load_config("run.yaml", overrides=[{"head": {"epochs": 30}}])
    catalens.train_model("photos/", "models/shop", cfg)                    # ingest → embed → heads
    catalens.evaluate_model("models/shop", "photos/", "reports/shop", cfg)  # metrics.json, report.html
    model = catalens.CatalensModel.load("models/shop")
    catalens.predict_catalogue(model, catalens.open_catalogue("new.yaml"), "pred.parquet", cfg)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> (module, attribute); resolved on first use
_API = {
    "load_config": ("catalens.config", "load_config"),
    "Config": ("catalens.config", "Config"),
    "open_catalogue": ("catalens.ingest.sources", "open_catalogue"),
    "create_backbone": ("catalens.embed.backbones", "create_backbone"),
    "create_head": ("catalens.heads", "create_head"),
    "train_model": ("catalens.train.pipeline", "train"),
    "evaluate_model": ("catalens.evaluate.pipeline", "evaluate_model"),
    "predict_catalogue": ("catalens.predict.predictor", "predict_catalogue"),
    "CatalensModel": ("catalens.artifact", "CatalensModel"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'catalens' has no attribute {name!r}")

"""catalens: product photos to categories and tags.

The library API behind the CLI, imported lazily (``import catalens`` stays cheap, no torch)::

    import catalens

    model = catalens.load("models/shop")                  # a Predictor
    model.predict("photo.jpg")                            # or a folder, glob, list, table, DataFrame, PIL image
    model.predict_proba(["a.jpg", "b.jpg"])               # {task: (n, C) probabilities}
    catalens.train(df, "models/new", label="category")    # a DataFrame (path + label columns), folder or YAML

    cfg = catalens.load_config("run.yaml", overrides=[{"head": {"epochs": 30}}])
    catalens.train_model("photos/", "models/shop", cfg)                    # the pipeline underneath
    catalens.evaluate_model("models/shop", "photos/", "reports/shop", cfg)  # metrics.json, report.html
    catalens.predict_catalogue(catalens.load_model("models/shop"), catalens.open_inputs("new/"), "pred.parquet", cfg)

Logging: catalens logs to the ``catalens`` logger and prints nothing itself; the CLI adds a
handler (``--quiet`` / ``--verbose``), a library user configures ``logging`` as they like.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> (module, attribute); resolved on first use
_API = {
    "load": ("catalens.api", "load"),
    "train": ("catalens.api", "train"),
    "Predictor": ("catalens.model.predictor", "Predictor"),
    "load_model": ("catalens.model.load", "load_model"),
    "Decoder": ("catalens.model.decode", "Decoder"),
    "open_inputs": ("catalens.ingest.inputs", "open_inputs"),
    "load_config": ("catalens.config", "load_config"),
    "Config": ("catalens.config", "Config"),
    "open_catalogue": ("catalens.ingest.open", "open_catalogue"),
    "create_backbone": ("catalens.embed.factory", "create_backbone"),
    "create_head": ("catalens.heads", "create_head"),
    "train_model": ("catalens.train.pipeline", "train"),
    "evaluate_model": ("catalens.evaluate.pipeline", "evaluate_model"),
    "predict_catalogue": ("catalens.predict.predictor", "predict_catalogue"),
    "CatalensModel": ("catalens.model.single", "CatalensModel"),
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'catalens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

__doc__ += "\nPublic API (``help(catalens.NAME)`` for each):\n\n" + "\n".join(
    f"- ``{n}`` ({m}.{a})" for n, (m, a) in sorted(_API.items())) + "\n"

"""One-line Python entry points: ``catalens.train(...)`` and ``catalens.load(...)``.

::

    import catalens

    model = catalens.train(df, "models/shop", label="category", title="title")   # or a folder / YAML
    model.predict("new_photos/")            # DataFrame: the columns of `catalens predict --out X.parquet`
    catalens.load("models/shop").predict(["a.jpg", "b.jpg"])
"""
from __future__ import annotations

from pathlib import Path

from catalens.model.predictor import Predictor, resolve_config, settings_overrides

__all__ = ["train", "load", "Predictor"]


def load(model: str | Path, config=None, graph: bool = False, **settings) -> Predictor:
    """The model folder ``model`` ready to answer: ``catalens.load("models/shop").predict("photo.jpg")``.

    ``config``: a :class:`catalens.Config` or a YAML file; ``settings`` override config keys
    (e.g. ``runtime="onnx"``, ``top_k=3``, ``cache_dir=...``, ``progress=False``). ``graph=True``
    answers through the model's exported ONNX graph without importing torch (exported once into
    the runtime cache when the folder has no current ``model.onnx``; :mod:`catalens.export.graph`):
    the fastest start for a few photos; large catalogues are faster through the default engine
    (embedding cache, decode overlapped with inference).
    """
    if not graph:
        from catalens.model.predictor import load as load_predictor

        return load_predictor(model, config, **settings)
    from catalens.export.graph import GraphModel, ensure_graph

    cfg = resolve_config(config, settings)
    return Predictor(GraphModel(model, ensure_graph(model), threads=cfg.engine.threads), model, cfg)


def train(data, out: str | Path, *, label=None, path: str | None = None, title: str | None = None,
          split: str | None = None, product: str | None = None, tags: dict | None = None, config=None,
          track: bool = False, preset: str | None = None, time_limit: str | float | None = None,
          **settings) -> Predictor:
    """Train a model on ``data`` and write it to the folder ``out``; returns it ready to predict.

    ``data``: a photo folder, a dataset ``.yaml``, a ``.bson`` dump, or a pandas DataFrame with a
    path column (``path=`` names it when it is not path/image/file/filepath) and label columns
    (``label=``: a column, a list, or ``{task: parent}`` for a hierarchy, root first), optionally
    ``title=`` (product titles; set ``text={"enabled": True}`` to learn from them), ``split=``
    (train/val/test), ``product=`` (several photos of one product) and ``tags={task: [0/1 columns]}``.
    ``config``: a :class:`catalens.Config` or a YAML file; ``settings`` override config keys
    (``epochs``-style nesting as dicts: ``head={"epochs": 30}``, ``backbone={"name": ...}``).
    ``track=True`` also logs the run to MLflow (as ``catalens train`` does).
    ``preset``: ``"fast"`` (default), ``"medium"`` or ``"best"`` with ``time_limit`` (seconds, or
    ``"20m"``-style), as ``catalens train --preset`` (docs/presets.md).
    """
    import pandas as pd

    from catalens.config import Config, load_config
    from catalens.train.presets import parse_duration, train_preset

    if config is None or isinstance(config, (str, Path)):
        cfg = load_config(config, [settings_overrides(settings)] if settings else None)
    else:
        cfg = Config.model_validate({**config.model_dump(), **settings_overrides(settings)}) if settings else config
    if isinstance(data, pd.DataFrame):
        from catalens.ingest.inputs import labelled_frame

        data = labelled_frame(data, label, path, title, split, product, tags)
    elif label is not None or tags is not None:
        raise ValueError("label= and tags= name DataFrame columns; a folder or dataset file describes its own labels")
    if preset is not None or time_limit is not None:
        update = {"name": preset} if preset is not None else {}
        if time_limit is not None:
            update["time_limit"] = parse_duration(time_limit)
        cfg = Config.model_validate({**cfg.model_dump(), "preset": {**cfg.preset.model_dump(), **update}})
    result = train_preset(data, out, cfg)
    if track:
        from catalens.track import log_training

        log_training(result, cfg, data=str(data) if not hasattr(data, "frame") else None)
    return Predictor(result.model, out, cfg)

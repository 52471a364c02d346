"""Ask a trained model about photos: ``catalens.load(MODEL).predict(x)``.

``x`` may be a path, a list of paths, a glob, a folder (any layout), a ``.txt`` list, a
``.csv``/``.parquet`` table, a dataset ``.yaml``, a ``.bson`` dump, a PIL image, encoded image
bytes, an ``(H, W, 3)`` uint8 array (or a list of those), or a pandas DataFrame with a ``path``
column and optionally a ``title`` column. Every kind becomes a catalogue
(:mod:`catalens.ingest.inputs`); in-memory images are encoded losslessly (PNG) and go through
the same decoding, resizing and cropping as files, so a photo gets the same answer whichever
way it arrives.

The result is a pandas DataFrame with exactly the columns ``catalens predict --out X.parquet``
writes (:func:`output_schema`), one row per input photo, in input order. A photo that cannot
be used keeps its row, with ``problem`` set and null predictions.

The same block-level functions serve ``catalens predict`` (:mod:`catalens.predict`), evaluate and
Ray: :func:`stream_probabilities` (features → fused probabilities, block by block) and
:func:`prediction_columns` (a block → its output columns, through the model's one decoder).
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from catalens.ingest.catalogue import Catalogue
from catalens.model.blocks import ProbabilityBlock, catalogue_titles
from catalens.model.decode import arrow_schema

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- columns

def true_label_tasks(tasks, cat: Catalogue) -> list[str]:
    """Class tasks of the model whose labels the catalogue carries (folder labels, dataset
    columns): written as ``true_<task>`` next to the predictions."""
    return [t.name for t in tasks if t.kind == "class" and t.name in cat.frame.columns
            and cat.frame[t.name].notna().any()]


def output_schema(tasks, true_tasks: list[str] = ()):
    """The arrow schema of prediction rows: base columns, ``true_<task>``, then task columns."""
    import pyarrow as pa

    return arrow_schema(tasks, {f"true_{n}": pa.string() for n in true_tasks})


def base_columns(cat: Catalogue, rows: np.ndarray, problems: dict[int, str], true_tasks=()) -> dict[str, list]:
    f = cat.frame.iloc[rows]
    cols = {"id": f["id"].astype(str).tolist(), "product_id": f["product_id"].astype(str).tolist(),
            "path": [p if isinstance(p, str) else None for p in f["path"]],
            "split": [s if isinstance(s, str) else None for s in f["split"]],
            "problem": [problems.get(int(r)) for r in rows]}
    for n in true_tasks:
        cols[f"true_{n}"] = [v if isinstance(v, str) else None for v in f[n]]
    return cols


def stream_probabilities(model, cat: Catalogue, cache=None, engine=None) -> Iterator[ProbabilityBlock]:
    """Blocks of probabilities for every row of ``cat``, in order: backbone features from the
    engine (and the embedding cache), the heads, and title fusion when the model has a title
    model and the catalogue has titles."""
    import torch

    from catalens.embed.engine import stream_features

    with torch.inference_mode():
        for block in stream_features(cat, model.backbone, cache, engine):
            probs = model.predict_proba_features(block.features, texts=catalogue_titles(cat, block.rows))
            problems = {int(p["row"]): f"{p['problem']}: {p['detail']}" for p in block.problems}
            yield ProbabilityBlock(block.rows, block.ok, probs, problems)


def prediction_columns(model, cat: Catalogue, block: ProbabilityBlock, top_k: int, true_tasks=()) -> dict[str, list]:
    """Every output column of ``block``'s rows, decoded by the model's decoder."""
    cols = base_columns(cat, block.rows, block.problems, true_tasks)
    decoder = model.decoder
    cols.update(decoder.columns(decoder.decode(block.probs, top_k), block.ok))
    return cols


# ----------------------------------------------------------------------------- in-memory images

class MemoryReader:
    """Reads ``mem:<i>`` paths from a list of encoded images (picklable: decode workers get a copy)."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def __call__(self, path: str) -> bytes:
        return self.blobs[int(path.split(":", 1)[1])]


def encode_image(x, i: int) -> bytes:
    """A PIL image, encoded bytes or an ``(H, W, 3)`` / ``(H, W)`` uint8 array → encoded bytes
    (PNG: lossless, so decoding gives the very same pixels back)."""
    from PIL import Image

    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))):
            raise ValueError(f"image {i}: an array must be uint8 (H, W, 3) RGB (or (H, W) grey, (H, W, 4) RGBA), "
                             f"got {x.dtype} {x.shape}; convert with arr.astype(np.uint8)")
        x = Image.fromarray(x)
    if isinstance(x, Image.Image):
        buf = io.BytesIO()
        x.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise TypeError(f"image {i}: cannot predict a {type(x).__name__}; give a path, a PIL image, bytes or a "
                    f"uint8 array")


def _is_image_object(x) -> bool:
    from PIL import Image

    return isinstance(x, (bytes, bytearray, memoryview, np.ndarray, Image.Image))


def memory_catalogue(images: list, titles=None) -> Catalogue:
    blobs = [encode_image(x, i) for i, x in enumerate(images)]
    ids = [str(i) for i in range(len(blobs))]
    frame = pd.DataFrame({"id": ids, "product_id": ids, "path": [f"mem:{i}" for i in ids], "split": None,
                          "text": list(titles) if titles is not None else None, "row": range(len(ids))})
    return Catalogue(frame=frame, tasks=[], root=Path.cwd(), source="memory", reader=MemoryReader(blobs))


def as_catalogue(x, titles=None, path_column: str | None = None, title_column: str | None = None) -> Catalogue:
    """Whatever :meth:`Predictor.predict` accepts, as a catalogue (input order kept)."""
    from catalens.ingest.inputs import open_inputs, table_catalogue

    if isinstance(x, Catalogue):
        cat = x
    elif isinstance(x, pd.DataFrame):
        cat = table_catalogue(x.reset_index(drop=True), Path.cwd(), "the DataFrame", path_column, title_column,
                              source="dataframe")
    elif _is_image_object(x):
        cat = memory_catalogue([x], titles)
        titles = None
    elif isinstance(x, (str, Path)):
        cat = open_inputs([x], path_column, title_column)
    else:
        items = list(x)
        if not items:
            raise ValueError("nothing to predict: the list is empty")
        if all(_is_image_object(v) for v in items):
            cat = memory_catalogue(items, titles)
            titles = None
        elif all(isinstance(v, (str, Path)) for v in items):
            cat = open_inputs(items, path_column, title_column)
        else:
            kinds = sorted({type(v).__name__ for v in items})
            raise TypeError(f"a list to predict holds either paths or images (PIL, bytes, arrays), got {kinds}")
    if titles is not None:
        titles = list(titles)
        if len(titles) != len(cat):
            raise ValueError(f"{len(titles)} titles for {len(cat)} photos: give one title (or None) per photo")
        cat.frame["text"] = [t if isinstance(t, str) and t.strip() else None for t in titles]
    return cat


# ----------------------------------------------------------------------------- the predictor

class Predictor:
    """A trained model that answers about photos (what :func:`catalens.load` returns).

    ``predict(x)`` → DataFrame (the columns of ``catalens predict``'s parquet output);
    ``predict_proba(x)`` → ``{task: (n, C) float32}`` probabilities (fused with titles when the
    model has a title model), rows of photos that failed are NaN. ``model`` is the underlying
    :class:`~catalens.model.single.CatalensModel` or :class:`~catalens.model.ensemble.EnsembleModel`.
    """

    def __init__(self, model, folder: str | Path | None = None, config=None) -> None:
        from catalens.config import Config

        self.model = model
        self.folder = Path(folder) if folder is not None else None
        self.config = config if config is not None else Config()

    def __repr__(self) -> str:
        tasks = ", ".join(f"{t.name} ({t.n_outputs} {'classes' if t.kind == 'class' else 'tags'})" for t in self.tasks)
        name = self.model.meta.get("backbone", {}).get("name", "?")
        return f"<catalens Predictor {self.folder or ''}: {name}; {tasks}>"

    @property
    def tasks(self):
        return self.model.tasks

    @property
    def decoder(self):
        return self.model.decoder

    def _engine(self, progress: bool):
        from catalens.embed.features import engine_config

        eng = engine_config(self.config)
        eng.progress = bool(progress and self.config.engine.progress)
        return eng

    def _cache(self, use_cache: bool):
        if not use_cache:
            return None
        from catalens.embed.cache import EmbeddingCache

        bb = self.model.backbone
        return EmbeddingCache(self.config.cache_dir, bb.fingerprint(), bb.feature_dim,
                              jpeg=bb.preprocess.decoder())  # the decoder model.json records

    def blocks(self, cat: Catalogue, use_cache: bool = True, progress: bool = False) -> Iterator[ProbabilityBlock]:
        """Probability blocks of every row of ``cat`` (see :func:`stream_probabilities`; a model
        answered through its ONNX graph streams its own, :class:`catalens.export.graph.GraphModel`, duck-typed by its ``graph``)."""
        if hasattr(self.model, "graph"):
            return self.model.blocks(cat, self.config.engine.batch_size, self.config.data.max_pixels)
        return stream_probabilities(self.model, cat, self._cache(use_cache), self._engine(progress))

    def predict(self, x, *, titles=None, top_k: int | None = None, path_column: str | None = None,
                title_column: str | None = None, use_cache: bool = True, progress: bool = False) -> pd.DataFrame:
        """One row per input photo, in input order, with the columns of the parquet output."""
        cat = as_catalogue(x, titles, path_column, title_column)
        top_k = top_k or self.config.top_k
        true_tasks = true_label_tasks(self.tasks, cat)
        schema = output_schema(self.tasks, true_tasks)
        tables = [pa.table(prediction_columns(self.model, cat, b, top_k, true_tasks), schema=schema)
                  for b in self.blocks(cat, use_cache, progress)]
        # through arrow, as the parquet file is read back: the same columns, types and nulls
        return (pa.concat_tables(tables) if tables else schema.empty_table()).to_pandas()

    def predict_proba(self, x, *, titles=None, path_column: str | None = None, title_column: str | None = None,
                      use_cache: bool = True) -> dict[str, np.ndarray]:
        """``{task: (n, C) float32}`` in input order; NaN rows for photos that failed."""
        cat = as_catalogue(x, titles, path_column, title_column)
        out = {t.name: np.full((len(cat), t.n_outputs), np.nan, np.float32) for t in self.tasks}
        for b in self.blocks(cat, use_cache):
            for k, v in b.probs.items():
                out[k][b.rows[b.ok]] = v[b.ok]
        return out


def load(model: str | Path, config=None, **settings) -> Predictor:
    """The model folder ``model`` ready to answer (what :func:`catalens.load` builds on).

    ``config``: a :class:`catalens.Config` or a YAML file; ``settings`` override config keys
    (e.g. ``runtime="onnx"``, ``top_k=3``, ``cache_dir=...``, ``progress=False``).
    """
    from catalens.model.load import load_model

    config = resolve_config(config, settings)
    return Predictor(load_model(model), model, config)


def resolve_config(config=None, settings: dict | None = None):
    """A :class:`catalens.Config` from ``config`` (a Config, a YAML file or None) and keyword
    ``settings`` (config keys; engine keys may be given flat: ``runtime="eager"``)."""
    from catalens.config import Config, load_config

    if config is None or isinstance(config, (str, Path)):
        return load_config(config, [settings_overrides(settings)] if settings else None)
    if settings:
        return Config.model_validate({**config.model_dump(), **settings_overrides(settings)})
    return config


#: keyword shortcuts of :func:`load` → config keys
ENGINE_KEYS = ("runtime", "workers", "batch_size", "threads", "progress", "decode")


def settings_overrides(settings: dict) -> dict:
    out: dict = {}
    for k, v in settings.items():
        if k in ENGINE_KEYS:
            out.setdefault("engine", {})[k] = v
        else:
            out[k] = v
    return out

"""The torch-free way to ask a model about a few photos: its exported ONNX graph + the decoder.

``catalens predict MODEL photo.jpg`` should answer in a couple of seconds, and importing torch
and timm alone costs more than that on a small machine. The exported graph (pixels → every
task's probabilities, :mod:`catalens.export.onnx`) needs only ONNX Runtime, Pillow and numpy; the
decoder (:mod:`catalens.model.decode`) needs numpy. Which graph:

1. ``MODEL/model.onnx`` when it was exported from this very model.json (``catalens export``);
2. else a graph in the runtime cache, ``<cache>/graphs/<model hash>.onnx``, exported there the
   first time (that once, torch is imported; the model folder is never written to).

Probabilities equal the torch path's to ~1e-6 (the export's parity check holds them under 1e-4;
tests/test_parity.py checks 1e-5 on real photos).
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from catalens.model.decode import Decoder
from catalens.model.format import DESCRIPTION_FILE, read_description

logger = logging.getLogger(__name__)


def model_hash(folder: str | Path) -> str:
    """sha256 of model.json (it changes with every save: it holds the creation time)."""
    h = hashlib.sha256()
    h.update((Path(folder) / DESCRIPTION_FILE).read_bytes())
    return h.hexdigest()


def default_graph_dir() -> Path:
    from catalens.config import default_cache_dir

    return Path(default_cache_dir()).parent / "graphs"


def find_graph(folder: str | Path, graph_dir: str | Path | None = None) -> Path | None:
    """An exported graph of this model folder, without exporting (None when there is none)."""
    from catalens.export.onnx import default_onnx_path, read_description as graph_description

    folder = Path(folder)
    digest = model_hash(folder)
    own = default_onnx_path(folder)
    if own.exists():
        try:
            if graph_description(own).get("source_model_sha256") == digest:
                return own
        except Exception:  # an unreadable graph is not used; the cache or an export serves instead
            pass
    cached = Path(graph_dir or default_graph_dir()) / f"{digest[:24]}.onnx"
    return cached if cached.exists() else None


def ensure_graph(folder: str | Path, graph_dir: str | Path | None = None) -> Path:
    """:func:`find_graph`, exporting into the runtime cache when there is none (torch, once)."""
    path = find_graph(folder, graph_dir)
    if path is not None:
        return path
    from catalens.export.onnx import export_onnx

    out = Path(graph_dir or default_graph_dir()) / f"{model_hash(folder)[:24]}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info(f"exporting {folder} to an ONNX graph once ({out}); later answers skip torch")
    export_onnx(folder, out, parity_n=4, log=logger.debug)
    return out


class GraphModel:
    """A model folder answered through its ONNX graph: ``tasks``, ``decoder``, :meth:`blocks`."""

    def __init__(self, folder: str | Path, graph: str | Path, threads: int | None = None,
                 backend: str = "auto") -> None:
        from catalens.export.onnx import OnnxModel

        self.folder = Path(folder)
        self.description = read_description(folder)
        self.decoder = Decoder.from_folder(folder)
        self.graph = OnnxModel(graph, threads=threads, backend=backend)  # OpenVINO where installed
        if [t.to_dict() for t in self.graph.tasks] != [t.to_dict() for t in self.decoder.tasks]:
            raise ValueError(f"the graph '{graph}' does not predict the tasks of '{self.folder / DESCRIPTION_FILE}'; "
                             f"export it again with 'catalens export {self.folder}'")
        self.tasks = self.decoder.tasks
        self.meta = self.description.model_dump(mode="json")

    @property
    def name(self) -> str:
        return self.description.backbone.get("name", "?")

    def blocks(self, cat, batch_size: int = 32, max_pixels: int | None = None):
        """:class:`~catalens.model.predictor.ProbabilityBlock` s of every row of ``cat``, in order
        (decoded in threads, one graph run per batch, titles fused by the decoder)."""
        from catalens.embed.decode import DecodeJob, decode_one
        from catalens.ingest.images import DEFAULT_MAX_PIXELS
        from catalens.model.blocks import ProbabilityBlock, catalogue_titles

        job = DecodeJob(reader=cat.reader, pre=self.graph.preprocess, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                        hash_content=False)
        paths = cat.frame["path"].astype(str).tolist()

        def one(i: int):  # the engine's own decode: same problem codes and texts
            d = decode_one(int(i), paths[i], job)
            return d.pixels, (f"{d.problem}: {d.detail}" if d.problem else None)

        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(cat), batch_size):
                rows = np.arange(start, min(start + batch_size, len(cat)))
                decoded = list(pool.map(one, rows))
                ok = np.array([px is not None for px, _ in decoded], dtype=bool)
                probs = {t.name: np.zeros((len(rows), t.n_outputs), np.float32) for t in self.tasks}
                if ok.any():
                    out = self.graph.run_hwc(np.stack([px for px, _ in decoded if px is not None]), batch_size)
                    for k, v in out.items():
                        probs[k][ok] = v
                probs = self.decoder.fuse(probs, catalogue_titles(cat, rows))
                problems = {int(r): p for r, (_, p) in zip(rows, decoded) if p is not None}
                yield ProbabilityBlock(rows, ok, probs, problems)

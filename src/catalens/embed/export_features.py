"""``catalens embed``: features of a whole catalogue written to a folder others can read."""
from __future__ import annotations

import logging
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from catalens.config import Config
from catalens.embed.factory import backbone_from_config
from catalens.ingest.open import open_catalogue

_logger = logging.getLogger(__name__)


def embed_to_folder(data: str | Path, out: str | Path, cfg: Config, log=None) -> Path:
    """Write ``embeddings.npy``, ``index.parquet`` and ``backbone.json`` into ``out``.

    Features stream block by block into ``embeddings.npy`` (written under a temporary name, then
    renamed), so memory does not grow with the catalogue: per row only ``ok`` and the problem
    texts are held (peak RSS on 100,000 rows vs 10,000: docs/benchmarks.md)."""
    log = log or _logger.info
    t0 = time.time()
    out = Path(out)
    cat = open_catalogue(data)  # a bad catalogue fails before anything is created
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone_from_config(cfg.backbone, lazy=True)  # torch module built only if the runtime needs it
    ok, problems = _stream_to_npy(cat, backbone, cfg, out / "embeddings.npy")
    index = pd.DataFrame({"id": cat.frame["id"].astype(str), "path": cat.frame["path"].astype(str),
                          "split": cat.frame["split"], "ok": ok,
                          "problem": [problems.get(i) for i in range(len(cat))]})
    tmp = out / "index.parquet.tmp"
    index.to_parquet(tmp, index=False)
    tmp.replace(out / "index.parquet")
    desc = backbone.describe() | {"fingerprint": backbone.fingerprint(), "images": len(cat),
                                  "failed": int((~ok).sum())}
    tmp = out / "backbone.json.tmp"
    tmp.write_text(json.dumps(desc, indent=1))
    tmp.replace(out / "backbone.json")
    dt = time.time() - t0
    log(f"{len(cat)} images embedded ({int((~ok).sum())} failed) into {out} in {dt:.1f}s "
        f"({len(cat) / max(dt, 1e-9):.1f} img/s)")
    return out


def _stream_to_npy(cat, backbone, cfg: Config, path: Path) -> tuple[np.ndarray, dict]:
    """Engine blocks (in row order) appended to a ``.npy`` file of ``(rows, dim)`` float32 whose
    header is written first; returns ``ok`` per row and row -> problem text."""
    import torch

    from catalens.embed.cache import EmbeddingCache
    from catalens.embed.engine import stream_features
    from catalens.embed.features import engine_config

    n, dim = len(cat), backbone.feature_dim
    cache = EmbeddingCache(cfg.cache_dir, backbone.fingerprint(), dim, jpeg=backbone.preprocess.decoder())
    ok, problems, written = np.zeros(n, dtype=bool), {}, 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, torch.inference_mode():
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                 "fortran_order": False, "shape": (n, dim)})
        for b in stream_features(cat, backbone, cache, engine_config(cfg)):
            if len(b.rows) and b.rows[0] != written:   # the engine yields consecutive blocks in order
                raise RuntimeError(f"engine block starts at row {b.rows[0]}, expected {written}")
            f.write(np.ascontiguousarray(b.features, dtype="<f4").tobytes())
            written += len(b.rows)
            ok[b.rows] = b.ok
            problems.update({p["row"]: f"{p['problem']}: {p['detail']}" for p in b.problems})
    if written != n:
        raise RuntimeError(f"the engine returned {written} of {n} rows; {tmp} left for inspection")
    tmp.replace(path)
    return ok, problems

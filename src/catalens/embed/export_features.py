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
    """Write ``embeddings.npy``, ``index.parquet`` and ``backbone.json`` into ``out``."""
    log = log or _logger.info
    from catalens.embed.features import catalogue_features

    t0 = time.time()
    out = Path(out)
    cat = open_catalogue(data)  # a bad catalogue fails before anything is created
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone_from_config(cfg.backbone)
    feats = catalogue_features(cat, backbone, cfg)
    problems = {p["row"]: f"{p['problem']}: {p['detail']}" for p in feats.problems}
    index = pd.DataFrame({"id": cat.frame["id"].astype(str), "path": cat.frame["path"].astype(str),
                          "split": cat.frame["split"], "ok": feats.ok,
                          "problem": [problems.get(i) for i in range(len(cat))]})
    tmp = out / "embeddings.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, feats.features)
    tmp.replace(out / "embeddings.npy")
    index.to_parquet(out / "index.parquet", index=False)
    desc = backbone.describe() | {"fingerprint": backbone.fingerprint(), "images": len(cat),
                                  "failed": int((~feats.ok).sum())}
    (out / "backbone.json").write_text(json.dumps(desc, indent=1))
    dt = time.time() - t0
    log(f"{len(cat)} images embedded ({int((~feats.ok).sum())} failed) into {out} in {dt:.1f}s "
        f"({len(cat) / max(dt, 1e-9):.1f} img/s)")
    return out

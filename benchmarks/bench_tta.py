"""Embedding with test-time augmentation: the engine's TTA against the graph with the views inside it.

On ``shared/data/clothing-small``, Lite2@300 with multilevel pooling (the backbone the presets' TTA recipe
took on clothing-small), ``hflip``, the runtime ``auto`` picks, end to end as ``catalens embed`` / predict
run it (decode included, a fresh embedding cache, so no cache hits), in one process, interleaved:

- ``plain``: the backbone without TTA (the floor: a TTA of one view runs the network twice, decodes once);
- ``tta, one graph``: the TTA module (the plain net and its mirrored view in one graph) through the runtime,
  as the engine ran it before 2026-12-02;
- ``tta, a pass per view``: the engine now (``catalens.embed.engine.PIXEL_VIEWS``): the plain network's own
  graph once per view, the mirror taken on the decoded pixels, features averaged; the same features.

Each is timed on its own ``--photos`` photos (different ones: nothing is cached), ``--rounds`` times.

    python benchmarks/bench_tta.py [--photos 500] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import SHARED_DATA, publish, table  # noqa: E402

BACKBONE = "efficientnet_lite2@300"
#: photos embedded first for each way, untimed (its runtime chosen and compiled)
WARM = 32


def main() -> None:
    import numpy as np

    import catalens.embed.engine as engine
    from catalens.config import Config
    from catalens.embed.factory import backbone_from_config
    from catalens.embed.features import catalogue_features
    from catalens.ingest.open import open_catalogue
    from catalens.model.tta import with_tta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    cfg = Config()
    cfg.backbone.name, cfg.backbone.pool, cfg.backbone.crop_pct = BACKBONE, "multilevel", 1.0
    cfg.cache_dir, cfg.engine.progress = tempfile.mkdtemp(prefix="bench-tta-"), False
    cat = open_catalogue(str(SHARED_DATA / "clothing-small"))
    plain = backbone_from_config(cfg.backbone)
    tta = with_tta(plain, ["hflip"])
    views = dict(engine.PIXEL_VIEWS)
    ways = {"plain": (plain, views), "tta, one graph": (tta, {}), "tta, a pass per view": (tta, views)}
    need = args.photos * len(ways) * args.rounds
    if len(cat) < need + WARM:
        raise SystemExit(f"bench_tta: {len(cat)} photos, {need + WARM} needed: lower --photos")
    order = np.random.default_rng(0).permutation(len(cat))
    parts = iter(np.array_split(order[:need], need // args.photos))

    def embed(rows, backbone, pixel_views) -> float:
        """Images/s of embedding ``rows`` (not cached) with the engine's pixel views set to ``pixel_views``."""
        engine.PIXEL_VIEWS.clear()
        engine.PIXEL_VIEWS.update(pixel_views)
        engine._RUNNER_CACHE.clear()
        mask = np.zeros(len(cat), bool)
        mask[rows] = True
        t = time.time()
        catalogue_features(cat.subset(mask), backbone, cfg)
        return int(mask.sum()) / (time.time() - t)

    try:
        for backbone, pixel_views in ways.values():   # each runtime built, chosen and compiled once, untimed
            embed(order[need:need + WARM], backbone, pixel_views)
        rates = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, (backbone, pixel_views) in ways.items():
                rates[name].append(embed(next(parts), backbone, pixel_views))
    finally:
        engine.PIXEL_VIEWS.clear()
        engine.PIXEL_VIEWS.update(views)
    best = {name: max(r) for name, r in rates.items()}
    rows = [[name, f"{best[name]:.1f}", f"{best['plain'] / best[name]:.2f}x",
             f"{best[name] / best['tta, one graph']:.2f}x" if name != "plain" else ""] for name in ways]
    body = table(["embedding", "img/s (best of rounds)", "cost vs plain", "speed vs one graph"], rows)
    body += (f"\n\n{BACKBONE} multilevel, `hflip`, {args.photos} photos of clothing-small per timing, {args.rounds} "
             "rounds interleaved, decode included, a fresh cache (no hits). A TTA of one view runs the network twice "
             "and decodes once: about two plain passes is the floor. The features of the two TTA ways are the "
             "same (tests/test_engine.py); the presets estimate a TTA recipe from the 'a pass per view' cost "
             "(catalens.train.presets.budget.TTA_VIEW_COST).")
    publish("bench_tta", "TTA: a pass per view against one graph", body, write=not args.no_write,
            command="python benchmarks/bench_tta.py" + "".join(f" {a}" for a in sys.argv[1:]))


if __name__ == "__main__":
    main()

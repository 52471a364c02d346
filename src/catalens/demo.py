"""``catalens demo``: a synthetic catalogue through train → evaluate → predict, offline, in minutes."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from catalens.config import Config

_logger = logging.getLogger(__name__)


def run_demo(out: str | Path = "catalens-demo", n_products: int = 300, cfg: Config | None = None, log=None) -> dict:
    """Generate the demo catalogue in ``out``, train, evaluate and predict; return the paths."""
    log = log or _logger.info
    from catalens.evaluate.pipeline import evaluate_model
    from catalens.predict.predictor import predict_catalogue
    from catalens.ingest.open import open_catalogue
    from catalens.synthetic import make_catalogue
    from catalens.embed.features import engine_config
    from catalens.train.pipeline import train

    t0 = time.time()
    out = Path(out)
    cfg = cfg or Config()
    log(f"1/4 generating a synthetic catalogue of {n_products} products in {out / 'data'}")
    dataset = make_catalogue(out / "data", n_products=n_products, seed=cfg.seed, bad_files=True)
    log("2/4 training (frozen EfficientNet-Lite0 features, cached + multi-task heads)")
    res = train(dataset, out / "model", cfg, log=log)
    log("3/4 evaluating on the test split")
    ev = evaluate_model(out / "model", dataset, out / "report", cfg, log=log)
    log("4/4 predicting the whole catalogue")
    pred = predict_catalogue(res.model, open_catalogue(dataset), out / "predictions.parquet", cfg, engine_config(cfg),
                             log=log)
    log(f"done in {time.time() - t0:.0f}s.\n  model:       {res.folder}\n  report:      {ev.report}\n"
        f"  predictions: {pred.path}\n  bad images found by ingest: {res.folder / 'ingest' / 'problems.csv'}")
    return {"model": res.folder, "report": ev.report, "predictions": pred.path, "dataset": dataset}

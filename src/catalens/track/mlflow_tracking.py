"""Experiment tracking: every ``catalens train`` becomes an MLflow run.

Where runs go: ``MLFLOW_TRACKING_URI`` when set, else a local SQLite store
``sqlite:///<cwd>/runs/mlflow.db`` with artifacts under ``<cwd>/runs/artifacts``. The
experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``catalens``. Tracking is off with the config
key ``tracking: false`` (``--set tracking=false``) or ``CATALENS_TRACKING=0``.

What a run holds:

- params: the resolved configuration, flattened (``head.lr``, ``backbone.name``, ...), plus
  the data path, backbone fingerprint and task list;
- metrics: per epoch (step = epoch) ``train_loss`` / ``val_loss``, ``lr`` (the rate of the
  epoch's last step) and the accuracies (``train_accuracy_by_task.<task>``, ...) from the heads'
  ``history_``; final validation metrics flattened as ``val.<task>.<metric>`` (accuracy,
  macro_f1, log_loss, ece, micro_f1, mean_average_precision, hierarchy path accuracy, ...);
  ``seconds``, ``train_images``, ``val_images``, ``best_epoch``;
- artifacts: the model folder (``model/``) and its ingest report (``ingest/``);
- tags: catalens version, model folder, dataset name, source.

:func:`log_training` never raises: a tracking failure prints a warning and training goes on.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "catalens"
_PARAM_MAX = 500
_BAD_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def tracking_enabled(cfg=None) -> bool:
    """Off by ``CATALENS_TRACKING=0`` (or false/no/off) or config ``tracking: false``."""
    env = os.environ.get("CATALENS_TRACKING")
    if env is not None and env.strip().lower() in {"0", "false", "no", "off", ""}:
        return False
    return bool(getattr(cfg, "tracking", True)) if cfg is not None else True


def default_store(cwd: str | Path | None = None) -> tuple[str, str]:
    """(tracking URI, artifact location) of the local store under ``<cwd>/runs``."""
    runs = Path(cwd or os.getcwd()).resolve() / "runs"
    return f"sqlite:///{runs / 'mlflow.db'}", (runs / "artifacts").as_uri()


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else the local SQLite store (its folder created)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    uri, _ = default_store()
    Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(cl, name: str | None = None, create: bool = True) -> str | None:
    """The id of experiment ``name`` (default ``MLFLOW_EXPERIMENT_NAME`` or ``catalens``)."""
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted" and create:
            cl.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    if not create:
        return None
    location = None
    uri = cl.tracking_uri if hasattr(cl, "tracking_uri") else tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI") and str(uri).startswith("sqlite:///"):
        db = Path(str(uri)[len("sqlite:///"):])
        location = (db.parent / "artifacts").as_uri()
    return cl.create_experiment(name, artifact_location=location)


def flatten(d, prefix: str = "") -> dict:
    """Nested dicts to ``{"a.b.c": value}``; empty dicts and lists kept as their text."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def clean_key(key: str) -> str:
    """An MLflow-valid name (letters, digits, ``_ - . space /``; ``>`` becomes ``/``)."""
    return _BAD_KEY.sub("_", key.replace(" > ", "/"))


_SKIP_METRIC_KEYS = {"per_class", "per_tag", "confusion", "thresholds", "levels", "kind"}


def metric_values(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """Scalar, finite numbers of an evaluation dict as ``prefix.task.metric``."""
    out: dict[str, float] = {}

    def walk(node, key):
        if isinstance(node, dict):
            for k, v in node.items():
                if str(k) not in _SKIP_METRIC_KEYS:
                    walk(v, f"{key}.{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if math.isfinite(float(node)):
                out[clean_key(key)] = float(node)

    walk(metrics, prefix)
    return out


def _params(result, cfg, data) -> dict[str, str]:
    params = {clean_key(k): v for k, v in flatten(cfg.model_dump(mode="json")).items()} if cfg is not None else {}
    model = getattr(result, "model", None)
    if data is not None:
        params["data"] = str(data)
    if model is not None:
        params["backbone.fingerprint"] = model.backbone.fingerprint()
        params["tasks"] = ", ".join(f"{t.name}:{t.kind}:{t.n_outputs}" for t in model.tasks)
    out = {}
    for k, v in params.items():
        text = "" if v is None else str(v)
        out[k] = text if len(text) <= _PARAM_MAX else text[:_PARAM_MAX - 3] + "..."
    return out


def history_metrics(history: list[dict]) -> list[tuple[str, float, int]]:
    """``(key, value, epoch)`` of every finite number in per-epoch history rows; nested dicts
    (e.g. ``val_accuracy_by_task``) become ``parent.child`` keys; anything else is skipped."""
    out = []

    def walk(prefix: str, value, step: int) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v, step)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out.append((clean_key(prefix), float(value), step))

    for row in history:
        step = int(row.get("epoch", 0))
        for k, v in row.items():
            if k != "epoch":
                walk(k, v, step)
    return out


def _chunks(items: list, n: int):
    for s in range(0, len(items), n):
        yield items[s:s + n]


def log_training(result, cfg=None, data=None, experiment: str | None = None, uri: str | None = None,
                 log=None) -> str | None:
    """Log a finished training (:class:`catalens.train.pipeline.TrainResult`) as an MLflow run.

    Returns the run id, or None when tracking is off or failed (a warning is printed; this
    function never raises).
    """
    log = log or _logger.info
    if not tracking_enabled(cfg):
        return None
    from catalens import distributed

    if not distributed.is_main():  # torchrun: only rank 0 logs the run
        return None
    run_id, cl = None, None
    try:
        from mlflow.entities import Metric, Param, RunTag

        cl = client(uri)
        exp = experiment_id(cl, experiment)
        folder = Path(result.folder)
        meta = getattr(result.model, "meta", {}) or {}
        tags = {"catalens.model_folder": str(folder.resolve()), "catalens.data": str(data or meta.get("data", "")),
                "catalens.version": _version(), "mlflow.source.name": "catalens train"}
        run = cl.create_run(exp, run_name=folder.name, tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in _params(result, cfg, data).items()]
        for part in _chunks(params, 100):
            cl.log_batch(run_id, params=part)
        metrics = []
        head = result.model.head
        for key, value, step in history_metrics(getattr(head, "history_", []) or []):
            metrics.append(Metric(key, value, now, step))
        finals = metric_values(result.metrics or {}, "val")
        finals.update({"seconds": float(result.seconds), "train_images": float(meta.get("train_images", 0)),
                       "val_images": float(meta.get("val_images", 0))})
        if getattr(head, "best_epoch_", None) is not None:
            finals["best_epoch"] = float(head.best_epoch_)
        if (meta.get("preset") or {}).get("cv_score") is not None:  # catalens train --preset: the CV of the result
            finals["preset_cv_score"] = float(meta["preset"]["cv_score"])
        metrics += [Metric(k, v, now, 0) for k, v in finals.items()]
        for part in _chunks(metrics, 1000):
            cl.log_batch(run_id, metrics=part)
        cl.log_artifacts(run_id, str(folder), "model")
        if (folder / "ingest").is_dir():
            cl.log_artifacts(run_id, str(folder / "ingest"), "ingest")
        _tensorboard(run_id, metrics)
        cl.log_batch(run_id, tags=[RunTag("catalens.status", "ok")])
        cl.set_terminated(run_id, "FINISHED")
        log(f"tracked as MLflow run {run_id} ({cl.tracking_uri}); list runs with 'catalens runs'")
        return run_id
    except Exception as e:  # tracking must never fail a training
        print(f"warning: experiment tracking failed ({type(e).__name__}: {e}); the model folder is "
              f"written all the same. Disable tracking with CATALENS_TRACKING=0 or --set tracking=false",
              file=sys.stderr)
        if run_id is not None and cl is not None:
            try:
                cl.set_terminated(run_id, "FAILED")
            except Exception:
                pass
        return None


def _tensorboard(run_id: str, metrics: list) -> None:
    """Per-epoch scalars for TensorBoard under ``runs/tensorboard/<run id>`` (only if installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return
    with SummaryWriter(str(Path(os.getcwd()) / "runs" / "tensorboard" / run_id)) as w:
        for m in metrics:
            w.add_scalar(m.key, m.value, m.step)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("catalens")
    except PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- reading runs

def _no_store(uri: str | None) -> bool:
    """True when reading would only create an empty local store (nothing was ever tracked here)."""
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    return not Path(default_store()[0][len("sqlite:///"):]).exists()


def _runs(cl, experiment: str | None):
    exp = experiment_id(cl, experiment, create=False)
    if exp is None:
        return []
    return list(cl.search_runs([exp], order_by=["attributes.start_time DESC"], max_results=1000))


def _headline(metrics: dict) -> dict:
    """The metrics shown in the run list: accuracy / micro-F1 per task."""
    keep = {}
    for k, v in sorted(metrics.items()):
        if k.startswith("val.") and k.count(".") == 2 and k.rsplit(".", 1)[1] in ("accuracy", "micro_f1"):
            keep[k[4:]] = round(v, 4)
    if "preset_cv_score" in metrics:
        keep["preset_cv"] = round(metrics["preset_cv_score"], 4)
    return keep


def list_runs(experiment: str | None = None, uri: str | None = None):
    """A DataFrame of the experiment's runs, newest first."""
    import pandas as pd

    rows = []
    if _no_store(uri):
        return pd.DataFrame(rows)
    for r in _runs(client(uri), experiment):
        m = r.data.metrics
        rows.append({"run_id": r.info.run_id, "name": r.info.run_name,
                     "start": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
                     "status": r.info.status, "backbone": r.data.params.get("backbone.name"),
                     "preset": r.data.params.get("preset.name"),
                     "head": r.data.params.get("head.type"), "epochs": int(m["best_epoch"]) if "best_epoch" in m else None,
                     "seconds": round(m.get("seconds", float("nan")), 1), **_headline(m)})
    return pd.DataFrame(rows)


def resolve_run(cl, experiment: str | None, run_id: str) -> str:
    """A full run id from an id or a unique prefix of one."""
    if len(run_id) == 32:
        return run_id
    ids = [r.info.run_id for r in _runs(cl, experiment) if r.info.run_id.startswith(run_id)]
    if len(ids) != 1:
        raise KeyError(f"run id '{run_id}' matches {len(ids)} runs; give more characters (see 'catalens runs')")
    return ids[0]


def compare_runs(run_ids: list[str], experiment: str | None = None, uri: str | None = None,
                 all_params: bool = False):
    """A DataFrame with one column per run: params that differ (all with ``all_params``), then final metrics."""
    import pandas as pd

    cl = client(uri)
    runs = [cl.get_run(resolve_run(cl, experiment, r)) for r in run_ids]
    cols = [r.info.run_id[:8] for r in runs]
    params = sorted(set().union(*(r.data.params for r in runs)))
    rows, index = [], []
    for k in params:
        values = [r.data.params.get(k) for r in runs]
        if all_params or len(set(values)) > 1:
            rows.append(values)
            index.append(f"param {k}")
    metrics = sorted(set().union(*(r.data.metrics for r in runs)))
    for k in metrics:
        rows.append([_round(r.data.metrics.get(k)) for r in runs])
        index.append(f"metric {k}" + (" (last epoch)" if k in ("train_loss", "val_loss") else ""))
    return pd.DataFrame(rows, index=index, columns=cols)


#: where a preset run's leaderboard sits among the run's artifacts (the model folder's leaderboard.csv)
LEADERBOARD = "model/leaderboard.csv"


def run_leaderboard(run_id: str, experiment: str | None = None, uri: str | None = None):
    """The leaderboard of a ``catalens train --preset medium|best`` run (its model folder's
    ``leaderboard.csv``, logged with the folder), as a DataFrame."""
    import tempfile

    import pandas as pd

    cl = client(uri)
    run = cl.get_run(resolve_run(cl, experiment, run_id))
    if LEADERBOARD not in {a.path for a in cl.list_artifacts(run.info.run_id, "model")}:
        preset = run.data.params.get("preset.name") or "fast"
        raise ValueError(f"run {run.info.run_id[:8]} ({run.info.run_name}) has no leaderboard: it was trained with "
                         f"preset '{preset}', and only 'catalens train --preset medium' or '--preset best' writes "
                         f"one (runs with a preset show it in the 'preset' column of 'catalens runs')")
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}   # one small file: no progress bar on stderr
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return pd.read_csv(cl.download_artifacts(run.info.run_id, LEADERBOARD, tmp))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _round(v):
    return None if v is None else round(float(v), 5)

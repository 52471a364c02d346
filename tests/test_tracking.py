"""MLflow tracking of training runs: a real SQLite store in a temporary folder."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("mlflow")

from catalens.cli import main  # noqa: E402
from catalens.config import load_config  # noqa: E402
from catalens.synthetic import make_catalogue  # noqa: E402
from catalens.track import log_training, tracking_enabled  # noqa: E402
from catalens.track.mlflow_tracking import client, experiment_id, flatten, metric_values  # noqa: E402
from catalens.train.pipeline import train  # noqa: E402

CFG = {"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30}, "tracking": True}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Two trainings (30 and 12 epochs) logged to ``<tmp>/runs/mlflow.db`` (the default store)."""
    root = tmp_path_factory.mktemp("tracked")
    data = make_catalogue(root / "data", n_products=120, size=128)
    old_cwd, saved = os.getcwd(), {k: os.environ.pop(k, None) for k in
                                   ("MLFLOW_TRACKING_URI", "CATALENS_TRACKING", "MLFLOW_EXPERIMENT_NAME")}
    os.chdir(root)
    try:
        runs = []
        for name, extra in (("m1", {}), ("m2", {"head": {"epochs": 12}})):
            cfg = load_config(None, [CFG, extra])
            runs.append(train(data, root / name, cfg, log=lambda *_: None))
            log_training(runs[-1], cfg, data=data, log=lambda *_: None)  # what `catalens train` does next
        r1, r2 = runs
        yield root, data, r1, r2
    finally:
        os.chdir(old_cwd)
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v


def _runs(root):
    cl = client(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    exp = experiment_id(cl, "catalens", create=False)
    return cl, list(cl.search_runs([exp], order_by=["attributes.start_time ASC"]))


def test_train_logs_a_run_with_params_epoch_metrics_and_artifacts(tracked):
    root, data, r1, _ = tracked
    assert (root / "runs" / "mlflow.db").exists()
    cl, runs = _runs(root)
    assert len(runs) == 2
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "m1"
    p = run.data.params
    assert p["head.epochs"] == "30" and p["backbone.name"] == "efficientnet_lite0"
    assert p["engine.runtime"] == "eager" and p["data"] == str(data)
    assert p["tasks"].startswith("department:class:4")
    # one point per epoch, in order
    hist = r1.model.head.history_
    series = cl.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in series] == [h["epoch"] for h in hist]
    assert [round(m.value, 6) for m in series] == [round(h["train_loss"], 6) for h in hist]
    assert len(cl.get_metric_history(run.info.run_id, "val_loss")) == len(hist)
    m = run.data.metrics
    assert m["val.category.accuracy"] == pytest.approx(r1.metrics["category"]["accuracy"])
    assert m["val.pattern.micro_f1"] == pytest.approx(r1.metrics["pattern"]["micro_f1"])
    assert "val.hierarchy.department/category.consistent_share" in m
    assert m["best_epoch"] == r1.model.head.best_epoch_
    # artifacts: the whole model folder and the ingest report, under runs/artifacts
    names = {a.path for a in cl.list_artifacts(run.info.run_id, "model")}
    assert {"model/model.json", "model/backbone.safetensors", "model/head.safetensors", "model/config.yaml"} <= names
    assert any(a.path == "ingest/summary.json" for a in cl.list_artifacts(run.info.run_id, "ingest"))
    assert (root / "runs" / "artifacts").is_dir()


def test_runs_command_lists_and_compares(tracked, capsys):
    root, _, _, _ = tracked
    cl, runs = _runs(root)
    ids = [r.info.run_id for r in runs]
    old = os.getcwd()
    os.chdir(root)
    try:
        assert main(["runs"]) == 0
        listing = capsys.readouterr().out
        assert all(i in listing for i in ids) and "category.accuracy" in listing
        assert main(["runs", "--compare", ids[0][:10], ids[1][:10]]) == 0
        cmp = capsys.readouterr().out
    finally:
        os.chdir(old)
    assert "param head.epochs" in cmp and "param backbone.name" not in cmp  # only differing params
    assert "metric val.category.accuracy" in cmp
    line = next(x for x in cmp.splitlines() if x.startswith("param head.epochs"))
    assert line.split()[-2:] == ["30", "12"]


def test_tracking_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("CATALENS_TRACKING", "0")
    assert not tracking_enabled(load_config())
    monkeypatch.delenv("CATALENS_TRACKING")
    assert tracking_enabled(load_config())
    assert not tracking_enabled(load_config(None, [{"tracking": False}]))
    monkeypatch.chdir(tmp_path)
    assert log_training(object(), load_config(None, [{"tracking": False}])) is None
    assert not (tmp_path / "runs").exists()


def test_tracking_failure_warns_and_never_raises(tracked, capsys):
    _, data, r1, _ = tracked
    assert log_training(r1, load_config(None, [CFG]), data=data, uri="nosuchscheme://nowhere") is None
    assert "warning: experiment tracking failed" in capsys.readouterr().err


def test_flatten_and_metric_names():
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    vals = metric_values({"t": {"kind": "class", "accuracy": 0.5, "ece": None, "per_class": {"x": {"f1": 1}}},
                          "hierarchy": {"a > b": {"path_accuracy": 0.25, "levels": ["a", "b"]}}})
    assert vals == {"val.t.accuracy": 0.5, "val.hierarchy.a/b.path_accuracy": 0.25}


def test_runs_command_without_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["runs"]) == 0
    assert "no runs" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()   # listing creates nothing


def test_fine_tuning_history_with_per_task_accuracies_becomes_flat_metrics():
    """Fine-tuning history rows hold a dict of per-task accuracies: each becomes its own metric
    (MLflow takes numbers only), and non-finite or non-numeric values are left out."""
    from catalens.track.mlflow_tracking import history_metrics

    history = [{"epoch": 1, "train_loss": 2.5, "val_loss": float("nan"), "seconds": 11.7,
                "val_accuracy": 0.89, "val_accuracy_by_task": {"articleType": 0.89, "master Category": 0.99}},
               {"epoch": 2, "train_loss": 2.1, "note": "text", "ok": True}]
    assert history_metrics(history) == [
        ("train_loss", 2.5, 1), ("seconds", 11.7, 1), ("val_accuracy", 0.89, 1),
        ("val_accuracy_by_task.articleType", 0.89, 1), ("val_accuracy_by_task.master Category", 0.99, 1),
        ("train_loss", 2.1, 2)]


def test_a_fine_tuned_run_is_tracked_with_per_task_epoch_metrics(tmp_path, monkeypatch):
    """The fine-tuning history (its rows hold per-task val accuracies) reaches MLflow as numbers."""
    for k in ("MLFLOW_TRACKING_URI", "CATALENS_TRACKING", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    data = make_catalogue(tmp_path / "data", n_products=40, size=64)
    ft = {"finetune": {"mode": "blocks", "blocks": 1, "epochs": 2, "views": 1, "workers": 0}}
    logged = []
    cfg = load_config(None, [CFG, ft])
    r = train(data, tmp_path / "m", cfg, log=logged.append)
    log_training(r, cfg, data=data, log=logged.append)
    assert not any("tracking failed" in m for m in logged), logged
    cl, [run] = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["catalens.status"] == "ok"
    hist = r.model.head.history_
    assert [h["epoch"] for h in hist] == [1, 2] and "category" in hist[0]["val_accuracy_by_task"]
    series = cl.get_metric_history(run.info.run_id, "val_accuracy_by_task.category")
    assert [(m.step, round(m.value, 6)) for m in series] == \
        [(h["epoch"], round(h["val_accuracy_by_task"]["category"], 6)) for h in hist]

"""End to end through the CLI on a generated catalogue: train → evaluate → predict → embed."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from catalens.cli import main
from catalens.synthetic import make_catalogue

FAST = ["--no-progress", "--runtime", "eager", "--set", "head.epochs=60"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = make_catalogue(root / "data", n_products=90, size=128, seed=1, bad_files=True)
    assert main(["train", str(data), "--out", str(root / "model"), *FAST]) == 0
    assert main(["evaluate", str(root / "model"), str(data), "--report", str(root / "report"), *FAST]) == 0
    # exit 1: some photos (the deliberately broken files) could not be used; their rows are kept
    assert main(["predict", str(root / "model"), str(data), "--out", str(root / "pred.parquet"), *FAST]) == 1
    return root, data


def test_model_folder_is_self_describing(run):
    root, _ = run
    meta = json.loads((root / "model" / "model.json").read_text())
    assert meta["format"] == "catalens-model/1"
    assert meta["backbone"]["name"] == "efficientnet_lite0"
    assert meta["backbone"]["preprocess"]["size"] == 224
    tasks = {t["name"]: t for t in meta["tasks"]}
    assert tasks["category"]["parent"] == "department"
    assert tasks["pattern"]["classes"] == ["striped", "checked", "dotted", "solid"]
    assert len(tasks["pattern"]["thresholds"]) == 4
    assert "torch" in meta["versions"]
    assert meta["hierarchy_paths"]["department > category"]
    for f in ("backbone.safetensors", "head.safetensors", "config.yaml", "ingest/problems.csv"):
        assert (root / "model" / f).exists(), f


def test_bad_files_are_listed_not_silently_dropped(run):
    root, data = run
    bad = json.loads((data.parent / "bad_files.json").read_text())
    problems = pd.read_csv(root / "model" / "ingest" / "problems.csv", dtype={"id": str})
    by_id = dict(zip(problems["id"], problems["problem"]))
    assert by_id[bad["missing"]] == "missing"
    assert by_id[bad["empty"]] == "empty"
    assert by_id[bad["truncated"]] == "truncated"
    assert by_id[bad["not_an_image"]] == "not_an_image"
    for ok_kind in ("cmyk", "rgba", "gray16", "exif_rotated"):   # converted, kept
        assert bad[ok_kind] not in by_id
    summary = json.loads((root / "model" / "ingest" / "summary.json").read_text())
    assert summary["excluded"] == 4


def test_metrics_json_has_the_documented_shape(run):
    root, _ = run
    m = json.loads((root / "report" / "metrics.json").read_text())
    cat = m["category"]
    assert cat["kind"] == "class" and cat["n"] > 0
    assert 0.5 < cat["accuracy"] <= 1.0 and cat["top5_accuracy"] >= cat["accuracy"]
    assert set(cat["per_class"]) <= {"t-shirt", "dress", "trousers", "shorts", "skirt", "shoe", "boot", "hat", "bag"}
    pat = m["pattern"]
    assert pat["kind"] == "tags" and set(pat["thresholds"]) == {"striped", "checked", "dotted", "solid"}
    assert 0 <= pat["micro_f1"] <= 1 and 0 <= pat["mean_average_precision"] <= 1
    assert 0 <= m["hierarchy"]["department > category"]["consistent_share"] <= 1 or m["hierarchy"]
    html = (root / "report" / "report.html").read_text()
    assert "data:image/png;base64" in html and "category" in html


def test_predictions_parquet_keeps_every_row(run):
    root, data = run
    table = pq.read_table(root / "pred.parquet").to_pandas()
    products = pd.read_csv(data.parent / "products.csv", dtype=str)
    assert len(table) == len(products)                       # nothing lost, bad rows included
    assert table["id"].tolist() == products["id"].tolist()   # in catalogue order
    bad = table[table["problem"].notna()]
    assert len(bad) == 4 and bad["category"].isna().all()
    good = table[table["problem"].isna()]
    assert good["category_top_labels"].map(len).eq(5).all()
    probs = np.stack(good["category_top_probs"].map(np.asarray))
    assert (np.diff(probs, axis=1) <= 1e-7).all()            # sorted, best first
    assert set(good["department"]) <= {"tops", "bottoms", "footwear", "accessories"}
    assert set(good["pattern_striped"]) <= {True, False}
    import pyarrow as pa
    assert pq.read_schema(root / "pred.parquet").field("pattern_striped").type == pa.bool_()


def test_predict_resumes_after_interrupt_without_duplicates(run, tmp_path, monkeypatch):
    from catalens.model.single import CatalensModel
    from catalens.config import load_config
    from catalens.ingest.open import open_catalogue
    from catalens.predict import predictor

    root, data = run
    model, cat = CatalensModel.load(root / "model"), open_catalogue(data)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}}])
    out = tmp_path / "p.parquet"
    real, calls = predictor._predict_part, []

    def interrupted(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(predictor, "_predict_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predictor.predict_catalogue(model, cat, out, cfg, part_rows=32, log=lambda *_: None)
    parts = out.with_name(out.name + ".parts")
    assert len(list(parts.glob("part-*.parquet"))) == 2 and not out.exists()
    monkeypatch.setattr(predictor, "_predict_part", real)
    res = predictor.predict_catalogue(model, cat, out, cfg, part_rows=32, log=lambda *_: None)
    assert res.resumed_parts == 2 and not parts.exists()
    resumed = pq.read_table(out).to_pandas()
    full = pq.read_table(root / "pred.parquet").to_pandas()
    pd.testing.assert_frame_equal(resumed.drop(columns=[]), full, check_exact=False, atol=1e-6)


def test_embed_writes_reusable_features(run, tmp_path):
    _, data = run
    assert main(["embed", str(data), "--out", str(tmp_path / "emb"), *FAST]) == 0
    emb = np.load(tmp_path / "emb" / "embeddings.npy")
    index = pd.read_parquet(tmp_path / "emb" / "index.parquet")
    assert emb.shape == (len(index), 1280)
    assert (~index["ok"]).sum() == 4 and np.all(emb[~index["ok"].to_numpy()] == 0)
    assert np.isfinite(emb).all() and np.abs(emb[index["ok"].to_numpy()]).sum(1).min() > 0


def test_unknown_backbone_error_lists_matches(tmp_path, capsys):
    data = make_catalogue(tmp_path / "d", n_products=12, size=96)
    rc = main(["train", str(data), "--out", str(tmp_path / "m"), "--backbone", "efficientnet_lite9", *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'efficientnet_lite9'" in err and "efficientnet_lite0" in err


def test_offline_timm_backbone_without_weights_is_a_clear_error(tmp_path, capsys):
    data = make_catalogue(tmp_path / "d", n_products=12, size=96)
    rc = main(["train", str(data), "--out", str(tmp_path / "m"), "--backbone", "resnet18", *FAST])
    assert rc == 2
    assert "offline" in capsys.readouterr().err


def test_version_from_a_source_tree_that_is_not_installed(monkeypatch):
    import importlib.metadata as md

    from catalens import __version__
    from catalens.cli import _version

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert _version() == f"catalens {__version__} (source tree, not installed)"

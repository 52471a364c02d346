"""One model, one answer, whatever the way in: ``catalens predict`` (parquet), ``catalens.load().predict``
and the server's three protocols (catalens API, TF-Serving REST, KServe v2) agree on real photos.

Parametrised over model kinds: single, ``--text`` (titles fused), hierarchy decoding, several
backbones side by side, and an ensemble. Top-1 labels (the decided ones: hierarchy decoding
applied) must be equal and probabilities within 1e-5 (torch eager on one side, the exported ONNX
graph in the server on the other).
"""
from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest

from catalens.cli import main

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

KINDS = ["single", "text", "hierarchy", "multi", "ensemble"]
TASKS = ["masterCategory", "subCategory", "articleType"]
TOL = 1e-5


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A 360-photo slice of fashion-products (train/val) and 12 test photos with their titles."""
    from conftest import SHARED

    root = SHARED / "fashion-products"
    if not (root / "styles.csv").exists():
        pytest.skip(f"real benchmark photos not found at {root}")
    base = tmp_path_factory.mktemp("parity")
    styles = pd.read_csv(root / "styles.csv", dtype=str)
    styles["path"] = [str(root / "images" / f"{i}.jpg") for i in styles["id"]]
    fit = pd.concat([styles[styles["split"] == "train"].head(300), styles[styles["split"] == "val"].head(60)])
    fit.to_csv(base / "fit.csv", index=False)
    (base / "fit.yaml").write_text(
        "table: fit.csv\nimage: path\nid: id\nsplit: split\ntext: productDisplayName\ntasks:\n"
        "  masterCategory: {kind: class}\n  subCategory: {kind: class, parent: masterCategory}\n"
        "  articleType: {kind: class, parent: subCategory}\n")
    test = styles[styles["split"] == "test"].head(12)[["path", "productDisplayName"]]
    test = test.rename(columns={"productDisplayName": "title"}).reset_index(drop=True)
    test.to_csv(base / "test.csv", index=False)
    return base, test


@pytest.fixture(scope="module")
def models(fashion):
    """Every model kind, trained once on the same slice (embeddings shared through the cache)."""
    base, _ = fashion
    # the fastest runtime; thresholds from val alone (no out-of-fold fits): parity does not depend on them
    common = ["--no-progress", "--set", "head.epochs=30", "--set", "tracking=false", "--set", "selective.oof_below=0"]
    data = str(base / "fit.yaml")
    out = {}
    for kind, extra in (("single", []), ("text", ["--text"]), ("hierarchy", ["--hierarchical-decoding"]),
                        ("multi", ["--backbone", "efficientnet_lite0+efficientnet_lite1@224"])):
        assert main(["train", data, "--out", str(base / kind), *common, *extra]) == 0
        out[kind] = base / kind
    assert main(["ensemble", str(base / "single"), str(base / "hierarchy"), "--out", str(base / "ensemble")]) == 0
    out["ensemble"] = base / "ensemble"
    return out


def _cli(model, fashion, tmp_path, titles: bool) -> pd.DataFrame:
    base, test = fashion
    out = tmp_path / "cli.parquet"
    args = ["predict", str(model), str(base / "test.csv"), "--out", str(out), "--no-progress",
            "--runtime", "eager", "--top-k", "3", "--no-cache"]
    if not titles:
        plain = tmp_path / "plain.csv"
        test[["path"]].to_csv(plain, index=False)
        args[2] = str(plain)
    assert main(args) == 0
    return pd.read_parquet(out)


def _server(model):
    from fastapi.testclient import TestClient

    from catalens.serve.app import ServeSettings, create_app

    return TestClient(create_app(ServeSettings(model_dir=str(model), max_batch=8, warmup=False)))


def _check(got_labels: dict, got_probs: dict, ref: pd.DataFrame, where: str) -> None:
    for task in TASKS:
        assert got_labels[task] == ref[task].tolist(), f"{where}: {task} labels differ"
        np.testing.assert_allclose(got_probs[task], ref[f"{task}_prob"].to_numpy(float), atol=TOL,
                                   err_msg=f"{where}: {task} probabilities differ")


@pytest.mark.parametrize("kind", KINDS)
def test_cli_python_and_every_protocol_agree(kind, models, fashion, tmp_path):
    import catalens

    base, test = fashion
    model = models[kind]
    titles = kind == "text"
    ref = _cli(model, fashion, tmp_path, titles)
    assert ref["problem"].isna().all()

    py = catalens.load(model, runtime="eager", progress=False, top_k=3)
    frame = test if titles else test[["path"]]
    got = py.predict(frame, use_cache=False)
    assert list(got.columns) == list(ref.columns)
    _check({t: got[t].tolist() for t in TASKS}, {t: got[f"{t}_prob"].to_numpy(float) for t in TASKS}, ref, "python")
    for t in TASKS:
        assert got[f"{t}_top_labels"].map(list).tolist() == ref[f"{t}_top_labels"].map(list).tolist()

    photos = [open(p, "rb").read() for p in test["path"]]
    with _server(model) as client:
        files = [("file", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(photos)]
        form = {"title": list(test["title"])} if titles else None   # one title per file, in order
        r = client.post("/v1/predict?top_k=3", files=files, data=form)
        assert r.status_code == 200, r.text
        images = r.json()["images"]
        _check({t: [im["labels"][t]["label"] for im in images] for t in TASKS},
               {t: np.array([im["labels"][t]["prob"] for im in images]) for t in TASKS}, ref, "catalens API")

        inputs = [{"name": "image", "shape": [len(photos)], "datatype": "BYTES",
                   "data": [base64.b64encode(b).decode() for b in photos]}]
        if titles:
            inputs.append({"name": "title", "shape": [len(photos)], "datatype": "BYTES", "data": list(test["title"])})
        r = client.post(f"/v2/models/{model.name}/infer", json={"inputs": inputs})
        assert r.status_code == 200, r.text
        outs = {o["name"]: o for o in r.json()["outputs"]}
        classes = {t.name: t.classes for t in py.tasks}
        labels = {t: outs[f"{t}_label"]["data"] for t in TASKS}
        probs = {}
        for t in TASKS:
            full = np.asarray(outs[t]["data"], dtype=float).reshape(outs[t]["shape"])
            probs[t] = full[np.arange(len(photos)), [classes[t].index(x) for x in labels[t]]]
        _check(labels, probs, ref, "KServe v2")

        # TF-Serving takes no titles: it must agree with the image-only answer
        ref_tf = ref if not titles else py.predict(test[["path"]], use_cache=False)
        r = client.post(f"/v1/models/{model.name}:predict",
                        json={"instances": [{"b64": base64.b64encode(b).decode()} for b in photos]})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        labels = {t: [p[f"{t}_label"] for p in preds] for t in TASKS}
        probs = {t: np.array([p[t][classes[t].index(p[f"{t}_label"])] for p in preds]) for t in TASKS}
        _check(labels, probs, ref_tf, "TF-Serving")


def test_hierarchy_decoding_gives_known_paths_everywhere(models, fashion, tmp_path):
    """With hierarchy decoding every answer is a path seen in training (what the server used to skip)."""
    import json

    model = models["hierarchy"]
    ref = _cli(model, fashion, tmp_path, titles=False)
    paths = {tuple(p) for p in json.loads((model / "model.json").read_text())["hierarchy_paths"][" > ".join(TASKS)]}
    assert all(tuple(r) in paths for r in ref[TASKS].itertuples(index=False))

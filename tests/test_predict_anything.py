"""Asking a trained model about photos as a new user would (issue: one inference core, predict anything).

Every source kind of ``catalens predict`` and of ``catalens.load().predict``, every output format,
the printed table, the exit codes, and the rule that one photo gets one answer whichever way it
arrives (file, folder, table, PIL image, bytes, array, DataFrame).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import catalens
from catalens.cli import main

FAST = ["--no-progress", "--runtime", "eager"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small synthetic catalogue (hierarchy + tags + titles) and a model trained on it."""
    from catalens.config import load_config
    from catalens.synthetic import make_catalogue
    from catalens.train.pipeline import train

    root = tmp_path_factory.mktemp("anything")
    data = make_catalogue(root / "data", n_products=80, size=96, seed=3)
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 40},
                              "tracking": False}])
    train(data, root / "model", cfg, log=lambda *a: None)
    products = pd.read_csv(root / "data" / "products.csv", dtype=str)
    photos = [root / "data" / "images" / f"{i}.jpg" for i in products["id"].head(6)]
    return root, data, photos


@pytest.fixture(scope="module")
def reference(trained):
    """The parquet answer for the first six photos, the yardstick of every other way in."""
    root, _, photos = trained
    out = root / "ref.parquet"
    assert main(["predict", str(root / "model"), *map(str, photos), "--out", str(out), *FAST]) == 0
    return pd.read_parquet(out)


def _model(trained):
    return catalens.load(trained[0] / "model", runtime="eager", progress=False)


def _same_answers(got: pd.DataFrame, ref: pd.DataFrame) -> None:
    for task in ("department", "category"):
        assert got[task].tolist() == ref[task].tolist()
        np.testing.assert_allclose(got[f"{task}_prob"].astype(float), ref[f"{task}_prob"].astype(float), atol=1e-5)
    assert [list(v) for v in got["pattern_tags"]] == [list(v) for v in ref["pattern_tags"]]


# ----------------------------------------------------------------------------- source kinds (CLI)

def test_one_photo_prints_a_table(trained, reference, capsys):
    root, _, photos = trained
    capsys.readouterr()
    assert main(["predict", str(root / "model"), str(photos[0]), *FAST]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "department", "category", "pattern"]
    r = reference.iloc[0]
    assert out[2].startswith("…" + str(photos[0])[-47:] + "  ")   # long paths keep their end
    assert f"{r['department']} {r['department_prob']:.2f}" in out[2]
    assert f"{r['category']} {r['category_prob']:.2f}" in out[2]
    assert len(out) == 3


def test_top_k_adds_runners_up_to_the_table(trained, reference, capsys):
    root, _, photos = trained
    capsys.readouterr()
    assert main(["predict", str(root / "model"), str(photos[0]), "--top-k", "2", *FAST]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    r = reference.iloc[0]
    second = r["category_top_labels"][1]
    assert f"({second} {r['category_top_probs'][1]:.2f})" in line


def test_many_photos_print_the_first_and_say_how_to_write_all(trained, capsys):
    root, _, photos = trained
    capsys.readouterr()
    assert main(["predict", str(root / "model"), *map(str, photos), "--show", "2", *FAST]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 2 + 2 + 2  # header, rule, 2 photos, blank, note
    assert "showing the first 2 of 6 photos; write them all with --out predictions.parquet" in out


def test_a_flat_folder_is_predicted_not_refused(trained, reference, tmp_path):
    root, _, photos = trained
    flat = tmp_path / "new_photos"
    (flat / "2026" / "11").mkdir(parents=True)
    for p in photos[:3]:
        shutil.copy(p, flat / p.name)
    for p in photos[3:]:
        shutil.copy(p, flat / "2026" / "11" / p.name)
    out = tmp_path / "p.parquet"
    assert main(["predict", str(root / "model"), str(flat), "--out", str(out), *FAST]) == 0
    df = pd.read_parquet(out)
    assert sorted(Path(p).name for p in df["path"]) == sorted(p.name for p in photos)
    assert not any(c.startswith("true_") for c in df.columns)   # not a labelled layout
    by_name = df.set_index(df["path"].map(lambda p: Path(p).name))
    ref = reference.set_index(reference["path"].map(lambda p: Path(p).name))
    _same_answers(by_name.loc[ref.index].reset_index(drop=True), ref.reset_index(drop=True))


def test_a_labelled_folder_keeps_its_labels_as_true_columns(trained, tmp_path):
    root, _, photos = trained
    folder = tmp_path / "labelled"
    for i, p in enumerate(photos):
        d = folder / ("shirts" if i % 2 else "shoes")
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name)
    out = tmp_path / "p.csv"
    assert main(["predict", str(root / "model"), str(folder), "--out", str(out), *FAST]) == 0
    df = pd.read_csv(out, dtype=str)
    assert "true_label" not in df.columns    # the model has no task 'label': nothing to compare with
    assert len(df) == 6


def test_quoted_glob_txt_list_and_tables(trained, reference, tmp_path):
    root, _, photos = trained
    model = str(root / "model")
    pattern = str(photos[0].parent / "0000[0-5].jpg")
    assert main(["predict", model, pattern, "--out", str(tmp_path / "g.parquet"), *FAST]) == 0
    _same_answers(pd.read_parquet(tmp_path / "g.parquet"), reference)

    listing = tmp_path / "list.txt"
    listing.write_text("# new photos\n\n" + "\n".join(str(p) for p in photos) + "\n")
    assert main(["predict", model, str(listing), "--out", str(tmp_path / "l.parquet"), *FAST]) == 0
    _same_answers(pd.read_parquet(tmp_path / "l.parquet"), reference)

    table = tmp_path / "export.csv"
    pd.DataFrame({"sku": range(6), "image": [str(p) for p in photos]}).to_csv(table, index=False)
    assert main(["predict", model, str(table), "--out", str(tmp_path / "t.parquet"), *FAST]) == 0
    _same_answers(pd.read_parquet(tmp_path / "t.parquet"), reference)

    pq_table = tmp_path / "export.parquet"
    pd.DataFrame({"photo_file": [str(p) for p in photos]}).to_parquet(pq_table)
    assert main(["predict", model, str(pq_table), "--path-column", "photo_file",
                 "--out", str(tmp_path / "t2.jsonl"), *FAST]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t2.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == reference["category"].tolist()


def test_a_table_without_a_path_column_names_its_columns(trained, tmp_path, capsys):
    root, _, photos = trained
    table = tmp_path / "bad.csv"
    pd.DataFrame({"sku": [1], "picture": [str(photos[0])]}).to_csv(table, index=False)
    assert main(["predict", str(root / "model"), str(table), *FAST]) == 2
    err = capsys.readouterr().err
    assert (f"error: '{table}' has no path column (looked for path, image, file, filepath, image_path, file_path); "
            f"its columns are ['sku', 'picture']: name it with --path-column COLUMN") in err


def test_dataset_yaml_keeps_true_labels(trained, tmp_path):
    root, data, _ = trained
    out = tmp_path / "d.parquet"
    assert main(["predict", str(root / "model"), str(data), "--out", str(out), *FAST]) == 0
    df = pd.read_parquet(out)
    labels = pd.read_csv(data.parent / "products.csv", dtype=str)
    assert df["true_category"].tolist() == labels["category"].tolist()
    assert df["true_department"].tolist() == labels["department"].tolist()
    assert (df["true_category"] == df["category"]).mean() > 0.5


# ----------------------------------------------------------------------------- output formats

def test_every_output_format_holds_the_same_rows(trained, reference, tmp_path):
    root, _, photos = trained
    for ext in ("csv", "jsonl"):
        out = tmp_path / f"p.{ext}"
        assert main(["predict", str(root / "model"), *map(str, photos), "--out", str(out), *FAST]) == 0
        if ext == "csv":
            df = pd.read_csv(out, dtype=str, keep_default_na=False)
            assert list(df.columns) == list(reference.columns)
            assert [json.loads(v) for v in df["category_top_labels"]] == [list(v) for v in reference["category_top_labels"]]
            assert df["pattern_striped"].tolist() == ["true" if v else "false" for v in reference["pattern_striped"]]
            df["pattern_tags"] = [json.loads(v) for v in df["pattern_tags"]]
        else:
            df = pd.DataFrame([json.loads(line) for line in out.read_text().splitlines()])
            assert list(df.columns) == list(reference.columns)
        _same_answers(df, reference)
        assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("*.parts"))


def test_unknown_output_extension_is_refused_before_any_work(trained, capsys):
    root, _, photos = trained
    assert main(["predict", str(root / "model"), str(photos[0]), "--out", "pred.xlsx", *FAST]) == 2
    assert "error: --out 'pred.xlsx': unknown output format '.xlsx'; name the file .parquet, .csv or .jsonl" \
        in capsys.readouterr().err


# ----------------------------------------------------------------------------- exit codes

def test_exit_code_1_when_some_photos_fail_and_their_rows_are_kept(trained, tmp_path, capsys):
    root, _, photos = trained
    broken = tmp_path / "broken.jpg"
    data = photos[0].read_bytes()
    broken.write_bytes(data[:len(data) // 2])
    out = tmp_path / "p.parquet"
    assert main(["predict", str(root / "model"), str(photos[1]), str(broken), "--out", str(out), *FAST]) == 1
    df = pd.read_parquet(out)
    assert df["problem"].isna().tolist() == [True, False]
    assert df["problem"].iloc[1].startswith("truncated: ")
    assert pd.isna(df["category"].iloc[1])
    capsys.readouterr()
    assert main(["predict", str(root / "model"), str(broken), *FAST]) == 1
    assert "problem: truncated" in capsys.readouterr().out


def test_exit_code_2_for_usage_and_data_errors(trained, tmp_path, capsys):
    root, _, photos = trained
    assert main(["predict", str(tmp_path / "nomodel"), str(photos[0])]) == 2
    assert f"error: '{tmp_path / 'nomodel'}' does not exist; create a model with 'catalens train DATA --out " \
           f"{tmp_path / 'nomodel'}'" in capsys.readouterr().err
    assert main(["predict", str(root / "model"), str(tmp_path / "missing.jpg")]) == 2
    assert f"error: SOURCE '{tmp_path / 'missing.jpg'}' does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["predict", str(root / "model"), str(photos[0]), "--part-rows", "0"])
    assert e.value.code == 2
    assert "argument --part-rows: must be >= 1, got 0" in capsys.readouterr().err


def test_outputs_never_overwrite_inputs(trained, tmp_path, capsys):
    root, data, photos = trained
    table = tmp_path / "products.csv"
    pd.DataFrame({"path": [str(photos[0])]}).to_csv(table, index=False)
    before = table.read_bytes()
    assert main(["predict", str(root / "model"), str(table), "--out", str(table)]) == 2
    assert "is an input of this command" in capsys.readouterr().err
    assert table.read_bytes() == before
    model_json = (root / "model" / "model.json").read_bytes()
    assert main(["predict", str(root / "model"), str(photos[0]), "--out", str(root / "model" / "p.csv")]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err
    assert (root / "model" / "model.json").read_bytes() == model_json


def test_resume_after_a_changed_catalogue_predicts_the_changed_part_again(trained, tmp_path, monkeypatch):
    """Killed after a part was written; then a file of that part removed and another added."""
    from catalens.config import load_config
    from catalens.ingest.inputs import open_inputs
    from catalens.model.load import load_model
    from catalens.predict import predictor

    root, _, photos = trained
    model = load_model(root / "model")
    cfg = load_config(None, [{"engine": {"progress": False, "runtime": "eager"}}])
    out = tmp_path / "p.parquet"
    real, calls = predictor._predict_part, []

    def interrupted(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(predictor, "_predict_part", interrupted)
    with pytest.raises(KeyboardInterrupt):      # parts 0 and 1 written, part 2 not
        predictor.predict_catalogue(model, open_inputs([str(p) for p in photos]), out, cfg, part_rows=2)
    monkeypatch.setattr(predictor, "_predict_part", real)
    changed = [photos[0], photos[1], photos[2], photos[0], photos[4], photos[5]]  # photos[3] removed, one added
    res = predictor.predict_catalogue(model, open_inputs([str(p) for p in changed]), out, cfg, part_rows=2)
    assert res.resumed_parts == 1                                     # only the unchanged part 0
    df = pd.read_parquet(out)
    assert df["path"].tolist() == [str(p) for p in changed]
    fresh = catalens.load(root / "model", runtime="eager", progress=False).predict([str(p) for p in changed])
    assert df["category"].tolist() == fresh["category"].tolist()


# ----------------------------------------------------------------------------- Python

def test_python_predict_takes_every_kind_of_input_with_the_parquet_columns(trained, reference):
    root, _, photos = trained
    model = _model(trained)
    by_paths = model.predict([str(p) for p in photos])
    assert list(by_paths.columns) == list(reference.columns)
    _same_answers(by_paths, reference)
    _same_answers(model.predict(str(photos[0].parent / "0000[0-5].jpg")), reference)
    _same_answers(model.predict(pd.DataFrame({"path": [str(p) for p in photos]})), reference)
    one = model.predict(str(photos[2]))
    assert len(one) == 1 and one["category"].iloc[0] == reference["category"].iloc[2]
    pil = [Image.open(p) for p in photos]
    arrays = [np.asarray(im.convert("RGB")) for im in pil]
    blobs = [p.read_bytes() for p in photos]
    for images in (pil, arrays, blobs):
        got = model.predict(images)
        assert list(got.columns) == list(reference.columns)
        assert got["id"].tolist() == [str(i) for i in range(6)]
        _same_answers(got, reference)


def test_predict_proba_matches_the_table(trained, reference):
    root, _, photos = trained
    proba = _model(trained).predict_proba([str(p) for p in photos])
    assert set(proba) == {"department", "category", "pattern"}
    classes = {t.name: t.classes for t in catalens.load_model(root / "model").tasks}
    best = [classes["category"][j] for j in proba["category"].argmax(1)]
    assert best == reference["category"].tolist()


def test_python_rows_of_bad_inputs_keep_their_place(trained, tmp_path):
    root, _, photos = trained
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    df = _model(trained).predict([str(photos[0]), str(bad), str(tmp_path / "gone.jpg"), str(photos[1])])
    assert df["path"].tolist() == [str(photos[0]), str(bad), str(tmp_path / "gone.jpg"), str(photos[1])]
    assert [p.split(":")[0] if isinstance(p, str) else None for p in df["problem"]] == [None, "empty", "missing", None]
    with pytest.raises(ValueError, match=r"image 0: an array must be uint8 \(H, W, 3\) RGB"):
        _model(trained).predict(np.zeros((8, 8, 3), np.float32))


def test_train_from_a_dataframe_then_predict(trained, tmp_path):
    root, data, _ = trained
    products = pd.read_csv(data.parent / "products.csv", dtype=str)
    df = pd.DataFrame({"file": [str(data.parent / "images" / f"{i}.jpg") for i in products["id"]],
                       "dept": products["department"], "cat": products["category"], "set": products["split"]})
    model = catalens.train(df, tmp_path / "m", label={"dept": None, "cat": "dept"}, split="set",
                           engine={"progress": False, "runtime": "eager"}, head={"epochs": 40}, tracking=False)
    desc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [t["name"] for t in desc["tasks"]] == ["dept", "cat"] and desc["tasks"][1]["parent"] == "dept"
    assert desc["data"] == f"<dataframe: {len(df)} rows>"
    got = model.predict(df.head(20))
    assert (got["cat"] == products["category"].head(20)).mean() > 0.5
    with pytest.raises(ValueError, match=r"label column 'colour' is not in the DataFrame"):
        catalens.train(df, tmp_path / "m2", label="colour")


def test_public_api_is_listed():
    names = dir(catalens)
    for n in ("load", "train", "Predictor", "load_model", "Decoder", "open_inputs", "evaluate_model"):
        assert n in names
    assert "- ``load`` (catalens.api.load)" in catalens.__doc__


def test_the_printed_table_is_answered_without_importing_torch(trained, reference, tmp_path):
    """A few photos through the exported graph: no torch, same answers as the torch engine."""
    import subprocess
    import sys

    root, _, photos = trained
    code = ("import sys\nfrom catalens.cli import main\n"
            f"rc = main(['predict', {str(root / 'model')!r}, {str(photos[0])!r}, {str(photos[1])!r}])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)\n")
    env = {**__import__("os").environ, "CATALENS_CACHE": str(tmp_path / "cache")}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "exporting" in first.stderr and first.stdout.strip().endswith("0")   # the graph is made once
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert again.stdout.strip().splitlines()[-1] == "NO-TORCH 0", again.stderr
    rows = again.stdout.splitlines()[2:4]
    for line, (_, r) in zip(rows, reference.head(2).iterrows()):
        assert f"{r['category']} {r['category_prob']:.2f}" in line
    assert not any((root / "model").glob("*.onnx"))   # the model folder is never written to


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graph_backends_match_the_torch_engine(trained, reference, backend):
    from catalens.embed.ov import openvino_available
    from catalens.export.graph import GraphModel, ensure_graph
    from catalens.model.predictor import Predictor

    if backend == "openvino" and not openvino_available():
        pytest.skip("openvino is not installed (pip install 'catalens[fast]')")
    root, _, photos = trained
    graph = GraphModel(root / "model", ensure_graph(root / "model"), threads=1, backend=backend)
    assert graph.graph.backend == backend
    got = Predictor(graph, root / "model").predict([str(p) for p in photos])
    assert list(got.columns) == list(reference.columns)
    _same_answers(got, reference)


def test_a_bson_dump_is_predicted_photo_by_photo(trained, tmp_path):
    """A MongoDB dump (the Cdiscount format): every picture a row, several per product, plus the
    per-product file next to it."""
    bson = pytest.importorskip("bson")
    root, _, photos = trained
    docs = [{"_id": 7, "imgs": [{"picture": photos[0].read_bytes()}, {"picture": photos[1].read_bytes()}]},
            {"_id": 8, "imgs": [{"picture": photos[2].read_bytes()}]}]
    dump = tmp_path / "new.bson"
    dump.write_bytes(b"".join(bson.encode(d) for d in docs))
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(root / "model"), str(dump), "--out", str(out), *FAST]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["product_id"] for r in rows] == ["7", "7", "8"]
    assert all(r["split"] is None for r in rows)           # an unlabelled dump gets no split
    fresh = _model(trained).predict([str(p) for p in photos[:3]])
    assert [r["category"] for r in rows] == fresh["category"].tolist()
    products = [json.loads(line) for line in (tmp_path / "p.products.jsonl").read_text().splitlines()]
    assert [p["product_id"] for p in products] == ["7", "8"] and [p["n_images"] for p in products] == [2, 1]


def test_no_command_writes_into_its_inputs(trained, tmp_path, capsys):
    """train --out inside the photo folder (it would become a class on the next run), an evaluation
    report inside the model, an ensemble over one of its members: refused, nothing written."""
    root, data, photos = trained
    folder = tmp_path / "photos"
    (folder / "red").mkdir(parents=True)
    shutil.copy(photos[0], folder / "red" / "a.jpg")
    assert main(["train", str(folder), "--out", str(folder / "m")]) == 2
    assert f"error: --out '{folder / 'm'}' lies inside the input folder '{folder}'" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["red"]
    assert main(["evaluate", str(root / "model"), str(data), "--report", str(root / "model" / "r")]) == 2
    assert "--report" in capsys.readouterr().err and not (root / "model" / "r").exists()
    assert main(["ensemble", str(root / "model"), str(root / "model"), "--out", str(root / "model")]) == 2
    assert "is an input of this command" in capsys.readouterr().err

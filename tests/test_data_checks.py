"""Hostile and unlucky input to the CLI and the data layer (issue 13, items 11, 12, 14, 15):
every case fails with the exact message, or is recovered with a warning, never a silent success."""
from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pandas as pd
import pytest

from catalens.cli import main
from catalens.config import load_config
from catalens.embed.cache import EmbeddingCache
from catalens.synthetic import make_catalogue

FAST = ["--no-progress", "--runtime", "eager"]


# --- item 11: numeric options ------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["train", "D", "--out", "M", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["train", "D", "--out", "M", "--batch-size", "-5"], "argument --batch-size: must be >= 1, got -5"),
    (["train", "D", "--out", "M", "--crop-pct", "0"], "argument --crop-pct: must be > 0, got 0"),
    (["train", "D", "--out", "M", "--crop-pct", "1.5"], "argument --crop-pct: must be <= 1, got 1.5"),
    (["train", "D", "--out", "M", "--image-size", "60000"], "argument --image-size: must be <= 1024, got 60000"),
    (["train", "D", "--out", "M", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["train", "D", "--out", "M", "--workers", "two"], "argument --workers: expected an integer, got 'two'"),
    (["search", "D", "--out", "S", "--minutes", "nan"], "argument --minutes: expected a finite number, got 'nan'"),
    (["search", "D", "--out", "S", "--trials", "0"], "argument --trials: must be >= 1, got 0"),
    (["audit", "D", "--near", "1.2"], "argument --near: must be <= 1, got 1.2"),
    (["export", "M", "--calibration-images", "0"], "argument --calibration-images: must be >= 1, got 0"),
    (["profile", "M", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["serve", "M", "--port", "70000"], "argument --port: must be <= 65535, got 70000"),
    (["serve", "M", "--max-upload-mb", "0"], "argument --max-upload-mb: must be > 0, got 0"),
    (["demo", "--products", "-3"], "argument --products: must be >= 1, got -3"),
])
def test_numeric_options_are_refused_with_the_bound(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_numbers_are_refused_naming_key_and_default():
    with pytest.raises(ValueError) as e:
        load_config(None, [{"head": {"lr": float("nan")}, "seed": -3}])
    text = str(e.value)
    assert "  head.lr: Input should be a finite number (got nan; default 0.003)" in text
    assert "  seed: Input should be greater than or equal to 0 (got -3; default 0)" in text
    with pytest.raises(ValueError, match=r"text.ngram: Value error, an n-gram range is \[lo, hi\] with "
                                         r"1 <= lo <= hi, e.g. \[1, 2\] \(got \[3, 1\]\)"):
        load_config(None, [{"text": {"ngram": [3, 1]}}])


# --- item 12: the embedding cache is checked on open -------------------------------------------

def _cache_with_two_parts(root):
    c = EmbeddingCache(root, "fp", 4, flush_every=2)
    c.add(["a", "b"], np.arange(8, dtype=np.float32).reshape(2, 4))
    c.add(["c", "d"], np.ones((2, 4), np.float32))
    return c.dir   # <root>/fp, or <root>/fp+simplejpeg where simplejpeg decodes the JPEGs


def test_truncated_cache_part_is_set_aside_with_a_warning(tmp_path, caplog):
    d = _cache_with_two_parts(tmp_path)
    emb = d / "part-00001.emb.npy"
    emb.write_bytes(emb.read_bytes()[:-5])
    with caplog.at_level(logging.WARNING, "catalens.embed.cache"):
        c = EmbeddingCache(tmp_path, "fp", 4)
        assert emb.exists() and not caplog.records   # opening reads nothing: the parts are checked on first use
        assert c.keys() == {"a", "b"}
    np.testing.assert_array_equal(c.get(["b"]), [[4, 5, 6, 7]])
    msg = caplog.records[0].getMessage()
    assert msg.startswith(f"embedding cache part '{emb}' set aside: 'part-00001.emb.npy' is unreadable "
                          f"or shorter than its header says")
    assert "its images will be embedded again" in msg
    assert not emb.exists() and len(list((d / "bad").glob("part-00001.*"))) == 2  # kept, not deleted


def test_a_cache_creates_its_folder_on_first_write(tmp_path):
    """A lossy run opens the fp32 cache only to find its sibling: that creates no empty folder."""
    other = EmbeddingCache(tmp_path, "other", 4)
    assert len(other) == 0 and "x" not in other and not other.dir.exists()
    other.add(["x"], np.ones((1, 4), np.float32))
    other.flush()
    assert EmbeddingCache(tmp_path, "other", 4).keys() == {"x"}


def test_two_processes_flushing_one_cache_at_once_keep_their_own_parts(tmp_path, monkeypatch):
    """Two runs filling one cache folder: the second flushes while the first is between its feature file
    and its keys file. Both picked the next free part number from the files on disk, so the first's keys
    landed beside the second's features (the check passes: same length). Each now claims its number."""
    import catalens.embed.cache as cache_mod

    first, second = EmbeddingCache(tmp_path, "fp", 4), EmbeddingCache(tmp_path, "fp", 4)
    first.add(["a", "b"], np.ones((2, 4), np.float32))
    second.add(["c", "d"], np.full((2, 4), 2, np.float32))
    save, calls = cache_mod._atomic_save, []

    def between(path, arr):   # the second run flushes right after the first one's feature file
        save(path, arr)
        calls.append(path.name)
        if len(calls) == 1:
            second.flush()
    monkeypatch.setattr(cache_mod, "_atomic_save", between)
    first.flush()
    assert calls == ["part-00000.emb.npy", "part-00001.emb.npy", "part-00001.keys.npy", "part-00000.keys.npy"]
    fresh = EmbeddingCache(tmp_path, "fp", 4)
    np.testing.assert_array_equal(fresh.get(["a", "b", "c", "d"]), [[1] * 4, [1] * 4, [2] * 4, [2] * 4])
    assert sorted(p.name for p in fresh.dir.iterdir() if p.suffix == ".lock") == []


def test_nan_rows_in_a_cache_part_are_found_even_after_verification(tmp_path, caplog):
    d = _cache_with_two_parts(tmp_path)
    assert EmbeddingCache(tmp_path, "fp", 4).keys() == {"a", "b", "c", "d"}  # verified once
    arr = np.load(d / "part-00000.emb.npy")
    arr[1, 2] = np.nan
    np.save(d / "part-00000.emb.npy", arr)  # changed after verification: scanned again
    with caplog.at_level(logging.WARNING, "catalens.embed.cache"):
        c = EmbeddingCache(tmp_path, "fp", 4)
    assert c.keys() == {"c", "d"}
    assert "'part-00000.emb.npy' row 1 holds non-finite values (NaN or inf)" in caplog.text


def test_non_finite_features_are_never_cached(tmp_path, caplog):
    c = EmbeddingCache(tmp_path, "fp", 2, flush_every=10)
    c.add(["a", "b"], np.array([[1, 2], [np.inf, 0]], np.float32))
    with caplog.at_level(logging.WARNING, "catalens.embed.cache"):
        c.flush()
    assert "1 of 2 new features are not finite (NaN or inf); not cached" in caplog.text
    assert EmbeddingCache(tmp_path, "fp", 2).keys() == {"a"}


def test_embed_recomputes_a_broken_cache_part(tmp_path, capsys):
    """Truncated and NaN parts: the next `catalens embed` warns, re-embeds and writes the same features."""
    data = make_catalogue(tmp_path / "d", n_products=6, size=96, seed=2)
    cache = tmp_path / "cache"
    args = ["embed", str(data), "--cache-dir", str(cache), *FAST]
    assert main([*args, "--out", str(tmp_path / "e1")]) == 0
    first = np.load(tmp_path / "e1" / "embeddings.npy")
    parts = sorted(cache.glob("*/part-*.emb.npy"))
    assert parts
    arr = np.load(parts[0])
    arr[0] = np.nan
    np.save(parts[0], arr)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "e2")]) == 0
    assert "row 0 holds non-finite values (NaN or inf)" in capsys.readouterr().err  # the CLI's stderr
    np.testing.assert_allclose(np.load(tmp_path / "e2" / "embeddings.npy"), first, atol=1e-5)
    part = sorted(cache.glob("*/part-*.emb.npy"))[0]
    part.write_bytes(part.read_bytes()[:200])
    assert main([*args, "--out", str(tmp_path / "e3")]) == 0
    assert f"embedding cache part '{part}' set aside" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(tmp_path / "e3" / "embeddings.npy"), first, atol=1e-5)


# --- item 14: tag spellings ----------------------------------------------------------------------

def _dataset(tmp_path, rows, header="sku,cat,striped,split", keys="split: split\n",
             tasks="  cat: {kind: class}\n  pattern: {kind: tags, columns: [striped]}\n"):
    (tmp_path / "t.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "d.yaml").write_text(f"table: t.csv\nimage: img/{{sku}}.jpg\nid: sku\n{keys}tasks:\n{tasks}")
    return tmp_path / "d.yaml"


def test_tag_spellings_accepted_and_others_refused_with_the_row(tmp_path):
    from catalens.ingest.open import open_catalogue

    rows = ["1,top,yes,train", "2,top,No,train", "3,top,TRUE,val", "4,top,false,test", "5,top,,test",
            "6,top,1,train", "7,top,0.0,train"]
    cat = open_catalogue(_dataset(tmp_path, rows))
    got = cat.encode()["pattern"][:, 0]
    np.testing.assert_array_equal(got, [1, 0, 1, 0, np.nan, 1, 0])
    for value in ("NA", "2", "maybe"):
        with pytest.raises(ValueError) as e:
            open_catalogue(_dataset(tmp_path, rows + [f"8,top,{value},train"]))
        assert str(e.value) == (f"task 'pattern': tag 'striped' of id '8' ('t.csv' row 9) holds '{value}'; "
                                f"expected 0 or 1 (also accepted: true/false, yes/no); leave the cell empty "
                                f"when unknown")


# --- item 15: catalogue structure ----------------------------------------------------------------

@pytest.mark.parametrize("tasks, message", [
    ("  cat: {kind: class, parent: cat}\n",
     "task 'cat' names itself as its parent; remove 'parent' or name the level above it"),
    ("  cat: {kind: class, parent: sub, column: cat}\n  sub: {kind: class, parent: cat, column: cat}\n",
     "task parents form a cycle: cat > sub > cat; a hierarchy runs from one root task down, so remove one 'parent'"),
])
def test_parent_cycles_are_refused(tmp_path, tasks, message):
    from catalens.ingest.open import open_catalogue

    with pytest.raises(ValueError) as e:
        open_catalogue(_dataset(tmp_path, ["1,top,1,train"], tasks=tasks))
    assert str(e.value) == message


@pytest.mark.parametrize("key", ["product", "split", "text"])
def test_missing_key_column_names_key_file_and_columns(tmp_path, key):
    from catalens.ingest.open import open_catalogue

    p = _dataset(tmp_path, ["1,top,1,train"], keys=f"{key}: title\n")
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value) == (f"dataset file '{p}': {key}: column 'title' is not in 't.csv'; columns are "
                            f"['sku', 'cat', 'striped', 'split'] (fix the name, or remove the '{key}' key)")


def test_invalid_dataset_file_points_to_a_readme_section_that_exists(tmp_path):
    from pathlib import Path

    from catalens.ingest.open import open_catalogue

    p = _dataset(tmp_path, ["1,top,1,train"], keys="colour: red\n")
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value).endswith("See README.md, section 'Data: what DATA can be', for the keys.")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "\n## Data: what `DATA` can be\n" in readme


def test_empty_class_folder_is_reported_in_problems(tmp_path, caplog):
    from catalens.ingest.open import open_catalogue
    from catalens.train.ingest_report import write_ingest_report

    from conftest import jpeg_bytes

    (tmp_path / "p" / "red").mkdir(parents=True)
    (tmp_path / "p" / "red" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "p" / "blue").mkdir()
    with caplog.at_level(logging.WARNING, "catalens.ingest.folder"):
        cat = open_catalogue(tmp_path / "p")
    assert f"class folder '{tmp_path / 'p' / 'blue'}' holds no files" in caplog.text
    summary = write_ingest_report(tmp_path / "ingest", cat, [], [], 1)
    problems = pd.read_csv(tmp_path / "ingest" / "problems.csv")
    assert problems[["path", "problem", "detail", "fix"]].values.tolist() == [
        [str(tmp_path / "p" / "blue"), "empty_folder", "class folder 'blue' holds no files",
         "add its photos, or remove the folder"]]
    assert summary["problems"] == {"empty_folder": 1} and summary["excluded"] == 0


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_max_pixels_can_exceed_pillows_limit_and_is_the_one_quoted():
    from catalens.ingest.images import ImageProblem, open_image

    big = _png_claiming(15000, 15000)  # 225 M pixels: Pillow alone refuses above 2 x 89.5 M
    with pytest.raises(ImageProblem) as e:
        open_image(big, max_pixels=1_000_000)
    assert "225,000,000 pixels > limit 1,000,000" in e.value.detail
    assert open_image(big, max_pixels=300_000_000).size == (15000, 15000)


def test_configured_max_pixels_reaches_the_embedding_pass(tmp_path):
    data = make_catalogue(tmp_path / "d", n_products=4, size=96, seed=4)
    assert main(["embed", str(data), "--out", str(tmp_path / "e"), "--set", "data.max_pixels=5000", *FAST]) == 0
    index = pd.read_parquet(tmp_path / "e" / "index.parquet")
    assert set(index["problem"]) == {"decompression_bomb: 96x96 = 9,216 pixels > limit 5,000"}


# --- BSON dumps ------------------------------------------------------------------------------------

def test_random_bytes_bson_is_refused(tmp_path, capsys):
    path = tmp_path / "junk.bson"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    rc = main(["embed", str(path), "--out", str(tmp_path / "e"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: BSON dump '{path}' holds no usable document: 1 problem(s), first: ")
    assert "See docs/bson.md" in err and not (tmp_path / "e").exists()


def _dump(path, docs):
    import bson

    path.write_bytes(b"".join(bson.encode(d) for d in docs))
    return path


def test_corrupt_bson_documents_are_in_problems_csv_and_unlabelled_rows_have_no_split(tmp_path):
    import struct

    from catalens.ingest.open import open_catalogue
    from catalens.train.ingest_report import write_ingest_report

    from conftest import jpeg_bytes

    pic = jpeg_bytes()
    good = [{"_id": i, "category_id": 1 + i % 2, "imgs": [{"picture": pic}]} for i in range(3)]
    garbage = struct.pack("<i", 40) + bytes(range(1, 35)) + b"\x00\x00"
    path = tmp_path / "d.bson"
    import bson
    path.write_bytes(bson.encode(good[0]) + garbage + bson.encode(good[1])
                     + bson.encode({"_id": 7, "imgs": [{"picture": pic}]}))  # no category: unlabelled
    offset = len(bson.encode(good[0]))
    with pytest.warns(UserWarning):
        cat = open_catalogue(path)
    write_ingest_report(tmp_path / "ingest", cat, [], [], 1)
    problems = pd.read_csv(tmp_path / "ingest" / "problems.csv")
    assert problems[["row", "path", "problem"]].values.tolist() == [
        [offset, f"{path.resolve()}::{offset}", "corrupt_document"]]
    assert problems["detail"].iat[0].startswith(f"document 1 at offset {offset}: ")
    assert cat.frame.loc[cat.frame["product_id"] == "7", "split"].tolist() == [None]
    assert cat.frame.loc[cat.frame["product_id"] != "7", "split"].notna().all()
    unlabelled = _dump(tmp_path / "test.bson", [{"_id": i, "imgs": [{"picture": pic}]} for i in range(5)])
    assert open_catalogue(unlabelled).frame["split"].isna().all()


# --- a small trained model: evaluation, file modes, permissions --------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-model")
    data = make_catalogue(root / "data", n_products=24, size=96, seed=5)
    old = os.umask(0o022)
    try:
        assert main(["train", str(data), "--out", str(root / "model"), *FAST, "--set", "head.epochs=20"]) == 0
    finally:
        os.umask(old)
    return root / "model", data


def test_evaluating_on_labels_the_model_never_saw_fails(tiny_model, tmp_path, capsys):
    model, data = tiny_model
    from conftest import jpeg_bytes

    other = tmp_path / "other"  # a photo folder: task 'label', which the model does not have
    for cls in ("hats", "socks"):
        (other / cls).mkdir(parents=True)
        (other / cls / "a.jpg").write_bytes(jpeg_bytes())
    rc = main(["evaluate", str(model), str(other), "--report", str(tmp_path / "r"), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"error: none of the 2 images of '{other}' has a label the model knows, so there is nothing to score:" in err
    assert "task 'department': the data has no such task (its tasks: ['label'])" in err
    assert "or use 'catalens predict' for unlabelled data." in err
    assert not (tmp_path / "r").exists()


def test_head_and_onnx_files_follow_the_umask(tiny_model, tmp_path):
    from catalens.export.onnx import export_onnx

    model, _ = tiny_model
    assert stat.S_IMODE((model / "head.safetensors").stat().st_mode) == 0o644
    old = os.umask(0o002)
    try:
        export_onnx(model, tmp_path / "m.onnx", parity_n=0, log=lambda *a: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.onnx").stat().st_mode) == 0o664


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_permission_error_is_one_clean_line(tiny_model, tmp_path, capsys):
    _, data = tiny_model
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc = main(["embed", str(data), "--out", str(locked / "e"), *FAST])
    finally:
        locked.chmod(0o700)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: permission denied: '{locked / 'e'}' (check the owner and mode of it and of its "
                       f"folder, or choose another path); set CATALENS_DEBUG=1 for the traceback")
    assert not any("Traceback" in line for line in err)


def test_os_errors_are_one_clean_line_even_as_root(monkeypatch, capsys):
    import catalens.embed.export_features as ef

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/srv/models/x")
    monkeypatch.setattr(ef, "embed_to_folder", denied)
    assert main(["embed", "D", "--out", "E"]) == 2
    assert capsys.readouterr().err == ("error: permission denied: '/srv/models/x' (check the owner and mode of it "
                                       "and of its folder, or choose another path); set CATALENS_DEBUG=1 for the "
                                       "traceback\n")

    def full(*a, **k):
        raise OSError(28, "No space left on device", "/srv/out/embeddings.npy")
    monkeypatch.setattr(ef, "embed_to_folder", full)
    assert main(["embed", "D", "--out", "E"]) == 2
    assert capsys.readouterr().err == ("error: no space left on device: '/srv/out/embeddings.npy'; "
                                       "set CATALENS_DEBUG=1 for the traceback\n")


@pytest.mark.parametrize("epochs, rows", [(1, 8), (2, 8), (20, 8), (10, 40), (1, 1)])
def test_few_head_epochs_train_without_a_scheduler_crash(epochs, rows):
    """20 epochs of one step each (a small catalogue) once hit ZeroDivisionError inside OneCycleLR."""
    from catalens.heads.estimator import MultiTaskHead
    from catalens.tasks import TaskInfo

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, 6)).astype(np.float32)
    y = {"c": (np.arange(rows) % 2).astype(np.int64)}
    head = MultiTaskHead([TaskInfo("c", "class", ["a", "b"])], epochs=epochs).fit(X, y)
    p = head.predict_proba(X)["c"]
    assert p.shape == (rows, 2) and np.allclose(p.sum(1), 1, atol=1e-5)


def test_unreadable_tables_name_the_file_and_the_fix(tmp_path):
    from catalens.ingest.open import open_catalogue

    p = _dataset(tmp_path, ["1,top,1,train"])
    t = tmp_path / "t.csv"
    t.write_bytes("sku,cat,striped,split\n1,t\xf6p,1,train\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value) == (f"table '{t}' is not UTF-8 text (line 2: byte b'\\xf6'); re-save it as UTF-8 "
                            f"(e.g. 'CSV UTF-8' in a spreadsheet)")
    t.write_text("sku,cat,striped,split\n1,top,1,train\n2,top,1,train,extra\n")
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value) == (f"table '{t}' cannot be read: Error tokenizing data. C error: Expected 4 fields in "
                            f"line 3, saw 5; fix the file (a CSV field holding the separator must be quoted)")
    t.write_text("sku,cat,striped,split\n1,top,1,train,extra\n")  # pandas alone shifts it onto an index
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value) == (f"table '{t}' has rows with more fields than its header line; name every column "
                            f"in the header, and quote fields holding the separator")
    t.write_text("")
    with pytest.raises(ValueError, match="is empty: expected a header line and one row per image"):
        open_catalogue(p)
    t.write_bytes("\ufeffsku,cat,striped,split\n1,top,1,train\n".encode("utf-8"))  # Excel's byte-order mark
    assert open_catalogue(p).frame["id"].tolist() == ["1"]


def test_dataset_file_needs_a_task(tmp_path):
    from catalens.ingest.open import open_catalogue

    with pytest.raises(ValueError, match=r"is invalid:\n  tasks: Dictionary should have at least 1 item"):
        open_catalogue(_dataset(tmp_path, ["1,top,1,train"], tasks=" {}\n"))


def test_yaml_errors_in_config_and_set_are_clean(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("head:\n  lr: [0.1\n")
    with pytest.raises(ValueError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"config file '{bad}' is not valid YAML: expected ',' or ']', but got ")
    bad.write_text("head: !!python/object:os.system {}\n")
    with pytest.raises(ValueError, match="is not valid YAML: could not determine a constructor"):
        load_config(bad)
    rc = main(["train", "D", "--out", "M", "--set", "head.lr=[0.1"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: --set head.lr=[0.1: the value is not valid YAML (")


def test_broken_link_in_a_class_folder_is_missing_not_skipped(tmp_path):
    from catalens.ingest.open import open_catalogue

    from conftest import jpeg_bytes

    (tmp_path / "p" / "red").mkdir(parents=True)
    (tmp_path / "p" / "red" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "p" / "red" / "b.jpg").symlink_to(tmp_path / "gone.jpg")
    assert open_catalogue(tmp_path / "p").frame["id"].tolist() == ["red/a.jpg", "red/b.jpg"]


def test_cache_keys_of_the_wrong_type_set_the_part_aside(tmp_path, caplog):
    d = _cache_with_two_parts(tmp_path)
    np.save(d / "part-00000.keys.npy", np.array([1, 2]))
    with caplog.at_level(logging.WARNING, "catalens.embed.cache"):
        assert EmbeddingCache(tmp_path, "fp", 4).keys() == {"c", "d"}
    assert "keys file 'part-00000.keys.npy' holds int64, not content hashes (bytes)" in caplog.text

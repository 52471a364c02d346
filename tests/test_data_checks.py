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
    return root / "fp"


def test_truncated_cache_part_is_set_aside_with_a_warning(tmp_path, caplog):
    d = _cache_with_two_parts(tmp_path)
    emb = d / "part-00001.emb.npy"
    emb.write_bytes(emb.read_bytes()[:-5])
    with caplog.at_level(logging.WARNING, "catalens.embed.cache"):
        c = EmbeddingCache(tmp_path, "fp", 4)
    assert c.keys() == {"a", "b"}
    np.testing.assert_array_equal(c.get(["b"]), [[4, 5, 6, 7]])
    msg = caplog.records[0].getMessage()
    assert msg.startswith(f"embedding cache part '{emb}' set aside: 'part-00001.emb.npy' is unreadable "
                          f"or shorter than its header says")
    assert "its images will be embedded again" in msg
    assert not emb.exists() and len(list((d / "bad").glob("part-00001.*"))) == 2  # kept, not deleted


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


def test_embed_recomputes_a_broken_cache_part(tmp_path, caplog):
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
    assert main([*args, "--out", str(tmp_path / "e2")]) == 0
    assert "row 0 holds non-finite values (NaN or inf)" in caplog.text
    np.testing.assert_allclose(np.load(tmp_path / "e2" / "embeddings.npy"), first, atol=1e-5)
    caplog.clear()
    part = sorted(cache.glob("*/part-*.emb.npy"))[0]
    part.write_bytes(part.read_bytes()[:200])
    assert main([*args, "--out", str(tmp_path / "e3")]) == 0
    assert f"embedding cache part '{part}' set aside" in caplog.text
    np.testing.assert_allclose(np.load(tmp_path / "e3" / "embeddings.npy"), first, atol=1e-5)


# --- item 14: tag spellings ----------------------------------------------------------------------

def _dataset(tmp_path, rows, header="sku,cat,striped,split", keys="split: split\n",
             tasks="  cat: {kind: class}\n  pattern: {kind: tags, columns: [striped]}\n"):
    (tmp_path / "t.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "d.yaml").write_text(f"table: t.csv\nimage: img/{{sku}}.jpg\nid: sku\n{keys}tasks:\n{tasks}")
    return tmp_path / "d.yaml"


def test_tag_spellings_accepted_and_others_refused_with_the_row(tmp_path):
    from catalens.ingest.sources import open_catalogue

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
    from catalens.ingest.sources import open_catalogue

    with pytest.raises(ValueError) as e:
        open_catalogue(_dataset(tmp_path, ["1,top,1,train"], tasks=tasks))
    assert str(e.value) == message


@pytest.mark.parametrize("key", ["product", "split", "text"])
def test_missing_key_column_names_key_file_and_columns(tmp_path, key):
    from catalens.ingest.sources import open_catalogue

    p = _dataset(tmp_path, ["1,top,1,train"], keys=f"{key}: title\n")
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value) == (f"dataset file '{p}': {key}: column 'title' is not in 't.csv'; columns are "
                            f"['sku', 'cat', 'striped', 'split'] (fix the name, or remove the '{key}' key)")


def test_invalid_dataset_file_points_to_a_readme_section_that_exists(tmp_path):
    from pathlib import Path

    from catalens.ingest.sources import open_catalogue

    p = _dataset(tmp_path, ["1,top,1,train"], keys="colour: red\n")
    with pytest.raises(ValueError) as e:
        open_catalogue(p)
    assert str(e.value).endswith("See README.md, section 'Data: what DATA can be', for the keys.")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "\n## Data: what `DATA` can be\n" in readme


def test_empty_class_folder_is_reported_in_problems(tmp_path, caplog):
    from catalens.ingest.sources import open_catalogue
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

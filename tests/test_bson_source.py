"""BSON dump source: streaming index, sidecar cache, random access, labels, splits, corruption."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import pickle
import struct
import sys

import numpy as np
import pytest

bson = pytest.importorskip("bson")
if not hasattr(bson, "encode"):  # the unrelated PyPI 'bson' package, not pymongo's
    pytest.skip("pymongo's bson is not installed", allow_module_level=True)

from catalens.ingest import bson_source as bs  # noqa: E402
from catalens.ingest.images import ImageProblem  # noqa: E402
from catalens.ingest.open import open_catalogue  # noqa: E402

from conftest import jpeg_bytes  # noqa: E402


@pytest.fixture(autouse=True, params=["bson.decode", "struct"])
def decoder(request, monkeypatch):
    """Every test runs with pymongo's C decoder and with the pure-struct parser."""
    if request.param == "struct":
        monkeypatch.setattr(bs, "fast_decoder", lambda: None)
    elif bs.fast_decoder() is None:
        pytest.skip("pymongo's C extension is not available")
    return request.param


def pictures(pid: int, n: int) -> list[bytes]:
    """``n`` distinct small JPEGs for product ``pid``."""
    return [jpeg_bytes(((pid * 37) % 256, (k * 80) % 256, 90), size=(24, 32), pattern=k) for k in range(n)]


def write_dump(path, docs: list) -> list[int]:
    """Write documents (dicts are bson-encoded, bytes written as is); return each one's offset."""
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for d in docs:
            data = bson.encode(d) if isinstance(d, dict) else d
            offsets.append(pos)
            f.write(data)
            pos += len(data)
    return offsets


def product(pid: int, n: int, category: int | None = 1000010653) -> dict:
    doc = {"_id": pid}
    if category is not None:
        doc["category_id"] = category
    doc["imgs"] = [{"picture": p} for p in pictures(pid, n)]
    return doc


@pytest.fixture
def dump(tmp_path):
    docs = [product(10, 1, 1000010653), product(11, 3, 1000010667), product(12, 2, 1000010653)]
    path = tmp_path / "train.bson"
    return path, write_dump(path, docs), docs


def test_rows_ids_labels_and_bytes(dump):
    path, offsets, docs = dump
    cat = open_catalogue(path)
    assert cat.source == "bson"
    f = cat.frame
    assert list(f["id"]) == ["10-0", "11-0", "11-1", "11-2", "12-0", "12-1"]
    assert list(f["product_id"]) == ["10", "11", "11", "11", "12", "12"]
    assert list(f["category"]) == ["1000010653", "1000010667", "1000010667", "1000010667",
                                   "1000010653", "1000010653"]
    assert list(f["row"]) == [0, 1, 1, 1, 2, 2]
    assert f["path"].iat[3] == f"{path.resolve()}::{offsets[1]}:2"
    assert [t.name for t in cat.tasks] == ["category"]
    assert cat.tasks[0].classes == ["1000010653", "1000010667"]
    assert cat.meta["problems"] == [] and cat.meta["documents"] == 3
    expected = [img["picture"] for d in docs for img in d["imgs"]]
    assert [cat.read_bytes(i) for i in range(len(cat))] == expected


def test_read_picture_returns_exact_bytes(dump):
    path, offsets, docs = dump
    for off, d in zip(offsets, docs):
        for k, img in enumerate(d["imgs"]):
            assert bs.read_picture(path, off, k) == img["picture"]
    with pytest.raises(bs.CorruptDocument, match="has 3 pictures"):
        bs.read_picture(path, offsets[1], 3)
    with pytest.raises(bs.CorruptDocument):
        bs.read_picture(path, offsets[1] + 1, 0)


def test_iter_pictures_streams_in_file_order(dump):
    path, offsets, docs = dump
    got = [(p.offset, p.k, p.product_id, p.category_id, p.data) for p in bs.iter_pictures(path)]
    want = [(o, k, str(d["_id"]), str(d["category_id"]), img["picture"])
            for o, d in zip(offsets, docs) for k, img in enumerate(d["imgs"])]
    assert got == want
    assert [o for o, _ in bs.iter_documents(path)] == offsets


def test_picklable_reader_and_fork(dump):
    path, _, docs = dump
    cat = open_catalogue(path)
    reader = cat.reader
    assert reader(cat.frame["path"].iat[1]) == docs[1]["imgs"][0]["picture"]  # opens a descriptor
    clone = pickle.loads(pickle.dumps(reader))
    assert clone(cat.frame["path"].iat[5]) == docs[2]["imgs"][1]["picture"]
    if sys.platform == "linux":
        with mp.get_context("fork").Pool(1) as pool:
            got = pool.map(reader, list(cat.frame["path"]))
        assert got == [img["picture"] for d in docs for img in d["imgs"]]


def test_reader_reports_a_changed_dump(dump, tmp_path):
    path, offsets, _ = dump
    cat = open_catalogue(path)
    path.write_bytes(b"\x00" * 10)  # the dump was replaced after indexing
    with pytest.raises(ImageProblem, match="undecodable"):
        bs.BsonReader()(cat.frame["path"].iat[1])
    with pytest.raises(ValueError, match="not a BSON picture reference"):
        bs.parse_ref("/x/y.bson:12:0")


def test_missing_category_keeps_rows_with_missing_labels(tmp_path):
    path = tmp_path / "test.bson"
    write_dump(path, [product(1, 2, None), product(2, 1, None)])
    for _ in range(2):  # scanned, then from the sidecar
        cat = open_catalogue(path)
        assert len(cat) == 3
        assert cat.frame["category"].tolist() == [None, None, None]
        assert cat.tasks[0].classes == []
        assert (cat.encode()["category"] == -1).all()
    assert cat.meta["index_from_cache"]


@pytest.mark.parametrize("name,columns", [
    ("category_names.csv", "category_id,category_level1,category_level2,category_level3"),
    ("train_categories.csv", "category_id,level1,level2,level3"),
])
def test_category_table_gives_a_hierarchy(tmp_path, name, columns):
    path = tmp_path / "train.bson"
    write_dump(path, [product(1, 1, 100), product(2, 2, 200), product(3, 1, 300), product(4, 1, 999)])
    (tmp_path / name).write_text(
        f"{columns}\n"
        "100,HOME,KITCHEN,MUGS\n"
        "200,HOME,GARDEN,TOOLS\n"
        "300,TOYS,OUTDOOR,TOOLS\n")  # 'TOOLS' under two parents
    cat = open_catalogue(path)
    assert [(t.name, t.parent) for t in cat.tasks] == [("level1", None), ("level2", "level1"),
                                                      ("level3", "level2")]
    f = cat.frame
    assert f["level1"].tolist() == ["HOME", "HOME", "HOME", "TOYS", None]
    assert f["level2"].tolist() == ["KITCHEN", "GARDEN", "GARDEN", "OUTDOOR", None]
    assert f["level3"].tolist() == ["MUGS", "TOOLS (GARDEN)", "TOOLS (GARDEN)", "TOOLS (OUTDOOR)", None]
    assert cat.task("level3").classes == ["MUGS", "TOOLS (GARDEN)", "TOOLS (OUTDOOR)"]
    assert cat.meta["categories_not_in_table"] == {"count": 1, "examples": ["999"]}
    assert cat.meta["category_table"].endswith(name)


def test_bad_category_table_is_named(tmp_path):
    path = tmp_path / "train.bson"
    write_dump(path, [product(1, 1, 100)])
    (tmp_path / "category_names.csv").write_text("category_id,level1,level2\n100,A,B\n")
    with pytest.raises(ValueError, match="lacks column"):
        open_catalogue(path)


def test_index_sidecar_is_reused_and_refreshed(dump):
    path, _, _ = dump
    first = open_catalogue(path)
    sidecar = path.with_name("train.bson.index.parquet")
    assert sidecar.exists() and first.meta["index"] == str(sidecar)
    assert not first.meta["index_from_cache"]
    stamp = sidecar.stat().st_mtime_ns
    second = open_catalogue(path)
    assert second.meta["index_from_cache"] and sidecar.stat().st_mtime_ns == stamp
    assert second.frame.equals(first.frame)
    assert [t.to_dict() for t in second.tasks] == [t.to_dict() for t in first.tasks]
    with open(path, "ab") as f:  # the dump grows: the index is rebuilt
        f.write(bson.encode(product(13, 1)))
    third = open_catalogue(path)
    assert not third.meta["index_from_cache"] and third.frame["product_id"].iat[-1] == "13"


def test_index_falls_back_to_user_cache(dump, monkeypatch, tmp_path):
    path, _, _ = dump
    monkeypatch.setenv("CATALENS_CACHE", str(tmp_path / "cache"))
    real = bs._write_atomic

    def read_only_next_to_dump(sidecar, index, stamp):
        if sidecar.parent == path.parent:
            raise PermissionError("read-only folder")
        real(sidecar, index, stamp)

    monkeypatch.setattr(bs, "_write_atomic", read_only_next_to_dump)
    index = bs.build_index(path)
    assert index.sidecar.startswith(str(tmp_path / "cache" / "bson-index"))
    assert bs.build_index(path).from_cache


def test_corrupt_documents_are_reported_by_offset(tmp_path):
    good = [product(1, 1), product(2, 2), product(3, 1)]
    garbage = struct.pack("<i", 40) + bytes(range(1, 35)) + b"\x00\x00"   # framed, undecodable
    no_imgs = {"_id": 9, "category_id": 5}
    pic_not_binary = {"_id": 8, "imgs": [{"picture": "a string"}]}
    truncated = bson.encode(product(4, 1))[:-7]
    path = tmp_path / "bad.bson"
    offs = write_dump(path, [good[0], garbage, no_imgs, good[1], pic_not_binary, good[2], truncated])
    with pytest.warns(UserWarning, match="4 problem"):
        cat = open_catalogue(path)
    assert cat.frame["product_id"].unique().tolist() == ["1", "2", "3"]
    probs = cat.meta["problems"]
    assert [p["offset"] for p in probs] == [offs[1], offs[2], offs[4], offs[6]]
    assert "no 'imgs' array" in probs[1]["problem"]
    assert "expected binary" in probs[2]["problem"]
    n_trunc = len(bson.encode(product(4, 1)))
    assert probs[3]["problem"] == (f"document at offset {offs[6]} claims {n_trunc} bytes, "
                                   f"only {n_trunc - 7} remain (truncated dump)")
    assert cat.meta["documents_skipped"] == 3 and cat.meta["documents"] == 3
    # full decoding reports the undecodable one too
    problems: list[dict] = []
    assert [o for o, _ in bs.iter_documents(path, problems)] == [offs[i] for i in (0, 2, 3, 4, 5)]
    assert [p["offset"] for p in problems] == [offs[1], offs[6]]


def test_absurd_length_prefix_stops_the_scan(tmp_path):
    path = tmp_path / "bad.bson"
    offs = write_dump(path, [product(1, 1), struct.pack("<i", 2**30) + b"rest of the file",
                             product(2, 1)])
    with pytest.warns(UserWarning):
        cat = open_catalogue(path)
    assert cat.frame["product_id"].tolist() == ["1"]
    (p,) = cat.meta["problems"]
    assert p["offset"] == offs[1] and "cannot be resynchronised" in p["problem"]
    assert f"last {path.stat().st_size - offs[1]} bytes" in p["problem"]
    write_dump(path, [product(1, 1), struct.pack("<i", 3)])
    with pytest.warns(UserWarning):
        assert "says 3 bytes" in open_catalogue(path).meta["problems"][0]["problem"]
    write_dump(path, [product(1, 1), b"\x01\x02"])
    with pytest.warns(UserWarning):
        assert "2 stray bytes" in open_catalogue(path).meta["problems"][0]["problem"]


def test_splits_are_by_product_hash(tmp_path):
    path = tmp_path / "many.bson"
    write_dump(path, [product(i, 1 + i % 4, 100 + i % 3) for i in range(400)])
    cat = open_catalogue(path)
    per_product = cat.frame.groupby("product_id")["split"].nunique()
    assert (per_product == 1).all()
    share = cat.frame.groupby("product_id")["split"].first().value_counts(normalize=True)
    assert 0.72 < share["train"] < 0.88 and 0.05 < share["val"] < 0.15 and 0.05 < share["test"] < 0.15
    for pid, split in cat.frame.groupby("product_id")["split"].first().items():
        pct = int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "little") % 100
        assert split == ("train" if pct < 80 else "val" if pct < 90 else "test")
    assert cat.meta["splits_from"] == "product_hash"
    assert open_catalogue(path).frame["split"].equals(cat.frame["split"])


def test_detect_and_parse_without_pymongo_paths(tmp_path):
    src = bs.BsonSource()
    p = tmp_path / "x.BSON"
    p.write_bytes(b"")
    assert src.detect(p) and not src.detect(tmp_path)
    assert not src.detect(tmp_path / "x.yaml")
    doc = bson.encode({"_id": "abc", "category_id": 7.0, "other": [1, {"x": None}],
                       "imgs": [{"picture": bson.Binary(b"old", 2)}]})
    for f in (bs.parse_document(doc), bs.read_document(doc, bson.decode)):
        assert (f.product_id, f.category_id) == ("abc", 7)
        assert f.pictures[0] == b"old" and len(f.pictures) == 1


def test_empty_dump(tmp_path):
    path = tmp_path / "empty.bson"
    path.write_bytes(b"")
    cat = open_catalogue(path)
    assert len(cat) == 0 and cat.meta["problems"] == []
    assert list(cat.frame.columns) == ["id", "product_id", "path", "split", "text", "row", "category"]
    assert np.asarray(cat.frame["split"]).size == 0


def test_mixed_id_and_category_types(tmp_path):
    path = tmp_path / "mixed.bson"
    docs = [product(1, 1, 5), product(2, 1, None),
            {"_id": "sku-3", "category_id": "shoes", "imgs": [{"picture": b"x"}]},
            {"_id": bson.ObjectId("65a1b2c3d4e5f60718293a4b"), "imgs": [{"picture": b"y"}]}]
    write_dump(path, docs)
    for _ in range(2):  # scanned, then from the sidecar
        cat = open_catalogue(path)
        assert cat.frame["product_id"].tolist() == ["1", "2", "sku-3", "65a1b2c3d4e5f60718293a4b"]
        assert cat.frame["category"].tolist() == ["5", None, "shoes", None]
        assert cat.read_bytes(3) == b"y"

"""The synthetic catalogue: layout, determinism, balance, splits, tags, pictures, broken files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from catalens.synthetic import (BAD_KINDS, CATEGORIES, DEPARTMENT_OF, DEPARTMENTS, PALETTE, TAGS, Look, Pose,
                                make_catalogue, make_folder_dataset, render)

N_PRODUCTS = 90  # 10 per category


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return make_catalogue(tmp_path_factory.mktemp("cat") / "data", n_products=N_PRODUCTS, size=96, seed=3,
                          bad_files=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """240 tiny products: enough rows for the statistics of tags and titles."""
    return make_catalogue(tmp_path_factory.mktemp("big"), n_products=240, size=16)


def _read(dataset: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    kw = dict(dtype=str, keep_default_na=False)
    return pd.read_csv(dataset.parent / "products.csv", **kw), pd.read_csv(dataset.parent / "tags.csv", **kw)


def _bad(dataset: Path) -> dict:
    return json.loads((dataset.parent / "bad_files.json").read_text())


def _good(dataset: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    products, tags = _read(dataset)
    keep = ~products["id"].isin(_bad(dataset).values())
    return products[keep], tags[keep]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- layout

def test_dataset_yaml_has_the_documented_keys(catalogue):
    spec = yaml.safe_load(catalogue.read_text())
    assert catalogue.name == "dataset.yaml"
    assert {k: spec[k] for k in ["name", "table", "image", "id", "product", "split", "text"]} == {
        "name": "catalens-demo", "table": "products.csv", "image": "images/{id}.jpg", "id": "id",
        "product": "product_id", "split": "split", "text": "title"}
    assert spec["tasks"] == {
        "department": {"kind": "class"},
        "category": {"kind": "class", "parent": "department"},
        "pattern": {"kind": "tags", "table": "tags.csv", "key": "id", "columns": list(TAGS)}}


def test_dataset_file_is_accepted_by_the_table_source_schema(catalogue):
    from catalens.ingest.table import load_spec
    spec = load_spec(catalogue)
    assert spec.tasks["category"].parent == "department"
    assert spec.tasks["pattern"].columns == list(TAGS)


def test_tables_have_the_columns_and_one_row_per_image(catalogue):
    products, tags = _read(catalogue)
    assert list(products.columns) == ["id", "product_id", "department", "category", "colour", "title", "split"]
    assert list(tags.columns) == ["id", *TAGS]
    assert products["id"].is_unique and list(products["id"]) == list(tags["id"])
    assert len(products) == N_PRODUCTS + len(BAD_KINDS)
    good, _ = _good(catalogue)
    for image_id in good["id"]:
        with Image.open(catalogue.parent / "images" / f"{image_id}.jpg") as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 96))


def test_hierarchy_colours_and_category_balance(catalogue):
    good, _ = _good(catalogue)
    assert set(good["category"]) == set(CATEGORIES)
    assert (good["department"] == good["category"].map(DEPARTMENT_OF)).all()
    assert set(good["department"]) == set(DEPARTMENTS)
    assert set(good["colour"]) <= set(PALETTE) and good["colour"].nunique() >= 6
    counts = good["category"].value_counts()
    assert counts.max() - counts.min() <= 1


def test_balance_bounds_when_not_divisible(tmp_path):
    products, _ = _read(make_catalogue(tmp_path, n_products=40, size=32))
    counts = products["category"].value_counts()
    assert len(counts) == len(CATEGORIES) and counts.max() - counts.min() <= 1


# ----------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_files_and_pixels(tmp_path):
    a = make_catalogue(tmp_path / "a", n_products=18, photos_per_product=2, size=64, seed=7, bad_files=True)
    b = make_catalogue(tmp_path / "b", n_products=18, photos_per_product=2, size=64, seed=7, bad_files=True)
    ha, hb = _hashes(a.parent), _hashes(b.parent)
    assert ha == hb and len(ha) == 36 + len(BAD_KINDS) - 1 + 4  # images (one bad file missing) + 4 tables
    first = sorted((a.parent / "images").glob("*.jpg"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(b.parent / "images" / first.name)))


def test_other_seed_gives_other_catalogue(tmp_path):
    a = make_catalogue(tmp_path / "a", n_products=18, size=64, seed=1)
    b = make_catalogue(tmp_path / "b", n_products=18, size=64, seed=2)
    assert _read(a)[0]["category"].tolist() != _read(b)[0]["category"].tolist()
    assert _hashes(a.parent / "images") != _hashes(b.parent / "images")


# ----------------------------------------------------------------------------- splits

def test_splits_are_by_product_and_roughly_70_15_15(catalogue):
    good, _ = _good(catalogue)
    assert good.groupby("product_id")["split"].nunique().max() == 1
    frac = good["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.70) < 0.08 and abs(frac["val"] - 0.15) < 0.06 and abs(frac["test"] - 0.15) < 0.06
    for split in ["train", "val", "test"]:  # 10 products per category: every split sees every category
        assert set(good.loc[good["split"] == split, "category"]) == set(CATEGORIES)


def test_several_photos_per_product_share_labels_and_split_but_differ(tmp_path):
    dataset = make_catalogue(tmp_path, n_products=27, photos_per_product=3, size=64, seed=5)
    products, tags = _read(dataset)
    assert len(products) == 81 and products["product_id"].nunique() == 27
    per_product = products.merge(tags, on="id").groupby("product_id")
    for col in ["department", "category", "colour", "title", "split", *TAGS]:
        assert per_product[col].nunique().max() == 1, col
    ids = products.loc[products["product_id"] == products["product_id"].iloc[0], "id"]
    pixels = [np.asarray(Image.open(dataset.parent / "images" / f"{i}.jpg"), np.int16) for i in ids]
    assert all(np.abs(pixels[0] - p).mean() > 2 for p in pixels[1:])  # pose / background vary


# ----------------------------------------------------------------------------- tags and titles

def test_tags_are_binary_and_solid_excludes_every_other_tag(catalogue):
    _, tags = _read(catalogue)
    t = tags[list(TAGS)].astype(int)
    assert set(np.unique(t.values)) <= {0, 1}
    others = t[["striped", "checked", "dotted"]].sum(axis=1)
    assert ((t["solid"] == 1) == (others == 0)).all()  # solid exactly when nothing else
    assert (t.sum(axis=1) >= 1).all()
    for tag in TAGS:
        assert t[tag].sum() >= 5, tag


def test_striped_and_dotted_sometimes_co_occur(big):
    _, tags = _read(big)
    t = tags[list(TAGS)].astype(int)
    assert ((t["striped"] == 1) & (t["dotted"] == 1)).sum() >= 3


def test_titles_are_informative_but_imperfect(big):
    products, tags = _read(big)
    empty = (products["title"] == "").mean()
    assert 0.03 <= empty <= 0.2
    titled = products[products["title"] != ""]
    lower = titled["title"].str.lower()
    assert all(t[0].isupper() for t in titled["title"])
    # a colour word in a title is the product's colour
    for colour in PALETTE:
        assert (titled.loc[lower.str.contains(rf"\b{colour}\b"), "colour"] == colour).all()
    assert lower.apply(lambda s: s.split()[0]).isin(list(PALETTE)).mean() > 0.6
    striped = tags.set_index("id").loc[titled["id"], "striped"].astype(int).values == 1
    says_striped = lower.str.contains("stripe|breton").values
    assert says_striped[striped].mean() > 0.5 and not says_striped[~striped].any()
    assert says_striped[striped].mean() < 1.0  # some titles leave the pattern out


# ----------------------------------------------------------------------------- pictures

POSE = Pose(cx=48, cy=48, scale=0.9, angle=5.0, flip=False, background=0, light=1.0)


def _interior(mask: np.ndarray, px: int = 2) -> np.ndarray:
    """Pixels fully inside the garment, ``px`` pixels away from its outline."""
    inside = mask > 0.99
    for _ in range(px):
        p = np.pad(inside, 1)
        inside = inside & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return inside


def _inside_std(look: Look) -> float:
    arr, mask = render(look, POSE, np.random.default_rng(0), 96, 96)
    return float(arr[_interior(mask)].astype(np.float32).std(axis=0).mean())


@pytest.mark.parametrize("tags", [("striped",), ("checked",), ("dotted",), ("striped", "dotted")])
def test_a_pattern_shows_as_variance_inside_the_garment(tags):
    for colour in ["blue", "white", "yellow"]:
        solid = _inside_std(Look("t-shirt", colour, ("solid",), 11))
        patterned = _inside_std(Look("t-shirt", colour, tags, 11))
        assert solid < 12 and patterned > solid + 15, (colour, solid, patterned)


def test_pattern_is_clipped_to_the_garment():
    rng = np.random.default_rng(0)
    solid, _ = render(Look("bag", "red", ("solid",), 4), POSE, rng, 96, 96)
    striped, mask = render(Look("bag", "red", ("striped",), 4), POSE, np.random.default_rng(0), 96, 96)
    outside = mask < 0.01
    assert np.array_equal(solid[outside], striped[outside])
    assert not np.array_equal(solid[mask > 0.99], striped[mask > 0.99])


def test_categories_have_distinct_silhouettes():
    masks = {c: render(Look(c, "black", ("solid",), 0), POSE, np.random.default_rng(0), 96, 96)[1] > 0.5
             for c in CATEGORIES}
    for i, a in enumerate(CATEGORIES):
        assert masks[a].mean() > 0.1, a  # a garment of reasonable size, not off the canvas
        for b in CATEGORIES[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.8, (a, b, iou)


def test_garment_colour_matches_colour_column(catalogue):
    good, tags = _good(catalogue)
    solid = good[(tags["solid"] == "1").values]
    checked = 0
    for _, row in solid.iterrows():
        a = np.asarray(Image.open(catalogue.parent / "images" / f"{row['id']}.jpg"), np.float32)
        border = np.concatenate([a[:3].reshape(-1, 3), a[-3:].reshape(-1, 3)])
        bg = np.median(border, axis=0)
        if np.abs(np.array(PALETTE[row["colour"]]) - bg).sum() < 90:
            continue  # e.g. a white garment on a white background
        garment = a[np.abs(a - bg).sum(axis=2) > 60]
        assert len(garment) > 0.05 * a.shape[0] * a.shape[1], row.to_dict()
        median = np.median(garment, axis=0)
        dist = {n: np.abs(np.array(c) - median).sum() for n, c in PALETTE.items()}
        assert min(dist, key=dist.get) == row["colour"], (row.to_dict(), median)
        checked += 1
    assert checked >= 15


# ----------------------------------------------------------------------------- broken files

def test_bad_files_json_names_one_id_per_kind(catalogue):
    bad = _bad(catalogue)
    products, tags = _read(catalogue)
    assert list(bad) == list(BAD_KINDS)
    assert len(set(bad.values())) == len(BAD_KINDS)
    assert set(bad.values()) <= set(products["id"]) and set(bad.values()) <= set(tags["id"])


def test_bad_files_are_broken_as_described(catalogue):
    bad = _bad(catalogue)
    path = {k: catalogue.parent / "images" / f"{i}.jpg" for k, i in bad.items()}
    assert not path["missing"].exists()
    assert path["empty"].stat().st_size == 0
    data = path["truncated"].read_bytes()
    assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9") and len(data) > 200
    with pytest.raises(OSError, match="truncated"), Image.open(path["truncated"]) as im:
        im.load()
    assert path["not_an_image"].stat().st_size > 0
    with pytest.raises(UnidentifiedImageError):
        Image.open(path["not_an_image"])
    with Image.open(path["cmyk"]) as im:
        assert (im.format, im.mode) == ("JPEG", "CMYK")
    with Image.open(path["rgba"]) as im:
        assert (im.format, im.mode) == ("PNG", "RGBA")
        alpha = np.asarray(im)[..., 3]
        assert alpha.min() == 0 and alpha.max() == 255
    head = path["gray16"].read_bytes()[:26]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[24] == 16 and head[25] == 0  # IHDR: 16-bit greyscale
    with Image.open(path["gray16"]) as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255
    with Image.open(path["exif_rotated"]) as im:
        assert im.format == "JPEG" and im.getexif().get(0x0112) == 6
        assert im.width > im.height  # stored landscape ...
        upright = ImageOps.exif_transpose(im)
        assert upright.size == (96, 120)  # ... shown portrait


def test_no_bad_files_by_default(tmp_path):
    dataset = make_catalogue(tmp_path, n_products=9, size=32)
    assert not (dataset.parent / "bad_files.json").exists()
    products, _ = _read(dataset)
    assert all((dataset.parent / "images" / f"{i}.jpg").stat().st_size > 0 for i in products["id"])


# ----------------------------------------------------------------------------- folder dataset

def test_folder_dataset_with_splits(tmp_path):
    root = make_folder_dataset(tmp_path / "f", n_per_class=20, size=48, seed=1)
    assert root == tmp_path / "f"
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val"]
    for cat in CATEGORIES:
        n = {s: len(list((root / s / cat).glob("*.jpg"))) for s in ["train", "val", "test"]}
        assert n == {"train": 14, "val": 3, "test": 3}, (cat, n)
    with Image.open(next((root / "train" / "hat").glob("*.jpg"))) as im:
        assert (im.format, im.size) == ("JPEG", (48, 48))
    again = make_folder_dataset(tmp_path / "g", n_per_class=20, size=48, seed=1)
    assert _hashes(root) == _hashes(again)


def test_folder_dataset_without_splits(tmp_path):
    root = make_folder_dataset(tmp_path, n_per_class=3, size=32, splits=False)
    assert sorted(p.name for p in root.iterdir()) == sorted(CATEGORIES)
    assert all(len(list((root / c).glob("*.jpg"))) == 3 for c in CATEGORIES)


def test_invalid_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError):
        make_catalogue(tmp_path, n_products=0)
    with pytest.raises(ValueError):
        make_folder_dataset(tmp_path, n_per_class=0)

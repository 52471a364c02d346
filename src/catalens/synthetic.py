"""A synthetic product catalogue, drawn on the fly (no downloads), for the demo and tests.

Every picture is one garment on a plain, lightly textured background. The **category**
comes from the silhouette (t-shirt with sleeves, trousers with two legs, bag with a handle,
...), the **department** is the category's parent, and the **pattern tags** come from the
fill drawn inside the garment mask: ``striped`` (lines at a random angle), ``checked``
(gingham grid), ``dotted`` (polka dots), ``solid`` (none of the others). ``striped`` and
``dotted`` sometimes co-occur; ``solid`` never does.

Pose (position, scale 0.7-1.0, slight rotation, mirror), background and lighting vary per
photo; colour, pattern and title belong to the product. Everything is derived from
``numpy.random.default_rng`` seeded with ``(seed, stream, index)``, so the same seed gives
byte-identical tables and identical pixels.

:func:`make_catalogue` writes a table dataset (``dataset.yaml`` + CSVs + ``images/``);
:func:`make_folder_dataset` writes a ``ROOT/<split>/<class>/`` photo folder.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

DEPARTMENTS: dict[str, list[str]] = {
    "tops": ["t-shirt", "dress"],
    "bottoms": ["trousers", "shorts", "skirt"],
    "footwear": ["shoe", "boot"],
    "accessories": ["hat", "bag"],
}
CATEGORIES: list[str] = [c for cats in DEPARTMENTS.values() for c in cats]
DEPARTMENT_OF: dict[str, str] = {c: d for d, cats in DEPARTMENTS.items() for c in cats}

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (196, 40, 42), "blue": (38, 86, 190), "green": (40, 138, 72), "yellow": (232, 196, 48),
    "black": (32, 32, 34), "white": (244, 244, 240), "grey": (128, 130, 132), "pink": (236, 138, 170),
}
COLOURS: list[str] = list(PALETTE)
BACKGROUNDS: list[tuple[int, int, int]] = [(250, 250, 250), (226, 226, 228), (238, 228, 206)]

TAGS: tuple[str, ...] = ("striped", "checked", "dotted", "solid")
# (tags, probability) of a product's pattern
PATTERN_MIX: list[tuple[tuple[str, ...], float]] = [
    (("solid",), 0.40), (("striped",), 0.22), (("checked",), 0.15), (("dotted",), 0.15),
    (("striped", "dotted"), 0.08),
]
SPLIT_FRACTIONS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
BAD_KINDS = ("missing", "empty", "truncated", "not_an_image", "cmyk", "rgba", "gray16", "exif_rotated")
JPEG_QUALITY = 90

DATASET_YAML = """\
name: catalens-demo
table: products.csv
image: images/{id}.jpg
id: id
product: product_id
split: split
text: title
tasks:
  department: {kind: class}
  category:   {kind: class, parent: department}
  pattern:    {kind: tags, table: tags.csv, key: id, columns: [striped, checked, dotted, solid]}
"""

_PATTERN_WORDS = {"striped": ["striped", "stripe", "breton"], "checked": ["checked", "plaid", "gingham"],
                  "dotted": ["polka-dot", "dotted", "spotted"]}
_MATERIALS = {"tops": ["cotton", "linen", "jersey"], "bottoms": ["denim", "cotton", "wool"],
              "footwear": ["leather", "suede", "canvas"], "accessories": ["straw", "leather", "canvas"]}
_NOUNS = {"t-shirt": ["t-shirt", "tee"], "dress": ["dress", "sundress"], "trousers": ["trousers", "pants", "chinos"],
          "shorts": ["shorts"], "skirt": ["skirt", "a-line skirt"], "shoe": ["shoes", "sneakers", "trainers"],
          "boot": ["boots", "ankle boots"], "hat": ["hat", "bucket hat"], "bag": ["bag", "tote"]}


# ----------------------------------------------------------------------------- silhouettes

def _arc(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0, n: int = 40) -> list:
    """Points on an ellipse arc (degrees, y down) in unit coordinates."""
    angles = np.radians(np.linspace(a0, a1, n, endpoint=(a1 - a0) < 360))
    return list(zip(cx + rx * np.cos(angles), cy + ry * np.sin(angles)))


def _shape_ops(category: str) -> list[tuple[list, int]]:
    """The silhouette as (polygon in unit coordinates ~[-1, 1], fill 255/0) drawing operations."""
    if category == "t-shirt":
        return [([(-0.18, -0.85), (0, -0.70), (0.18, -0.85), (0.45, -0.80), (0.88, -0.42), (0.66, -0.22),
                  (0.45, -0.40), (0.45, 0.85), (-0.45, 0.85), (-0.45, -0.40), (-0.66, -0.22),
                  (-0.88, -0.42), (-0.45, -0.80)], 255)]
    if category == "dress":
        return [([(-0.26, -0.92), (-0.12, -0.92), (0, -0.78), (0.12, -0.92), (0.26, -0.92), (0.30, -0.35),
                  (0.22, -0.15), (0.62, 0.90), (-0.62, 0.90), (-0.22, -0.15), (-0.30, -0.35)], 255)]
    if category == "trousers":
        return [([(-0.42, -0.90), (0.42, -0.90), (0.50, 0.90), (0.12, 0.90), (0, -0.30), (-0.12, 0.90),
                  (-0.50, 0.90)], 255)]
    if category == "shorts":
        return [([(-0.50, -0.55), (0.50, -0.55), (0.64, 0.35), (0.08, 0.42), (0, -0.02), (-0.08, 0.42),
                  (-0.64, 0.35)], 255)]
    if category == "skirt":
        return [([(-0.34, -0.62), (0.34, -0.62), (0.72, 0.62), (-0.72, 0.62)], 255)]
    if category == "shoe":
        toe = _arc(0.58, 0.22, 0.30, 0.20, -70, 90, 12)
        return [([(-0.84, -0.36), (-0.38, -0.36), (-0.12, -0.08), (0.50, 0.02)] + toe + [(-0.84, 0.42)], 255)]
    if category == "boot":
        toe = _arc(0.52, 0.40, 0.26, 0.22, -80, 90, 12)
        return [([(-0.58, -0.92), (-0.04, -0.92), (-0.04, 0.02), (0.48, 0.16)] + toe + [(-0.58, 0.62)], 255)]
    if category == "hat":
        crown = [(-0.46, 0.16)] + _arc(0, -0.20, 0.46, 0.50, 180, 360, 24) + [(0.46, 0.16)]
        return [(_arc(0, 0.18, 0.92, 0.17), 255), (crown, 255)]
    if category == "bag":
        body = [(-0.62, -0.18), (0.62, -0.18), (0.74, 0.78), (-0.74, 0.78)]
        return [(_arc(0, -0.22, 0.40, 0.56), 255), (_arc(0, -0.22, 0.29, 0.45), 0), (body, 255)]
    raise ValueError(f"unknown category '{category}'; expected one of {CATEGORIES}")


# ----------------------------------------------------------------------------- looks and poses

@dataclass(frozen=True)
class Look:
    """What belongs to the product: category, colour, pattern tags and pattern parameters."""

    category: str
    colour: str
    tags: tuple[str, ...]
    pattern_seed: int


@dataclass(frozen=True)
class Pose:
    """What changes from photo to photo: placement, background, lighting."""

    cx: float
    cy: float
    scale: float
    angle: float
    flip: bool
    background: int
    light: float


def _draw_tags(rng: np.random.Generator) -> tuple[str, ...]:
    probs = np.array([p for _, p in PATTERN_MIX])
    return PATTERN_MIX[int(rng.choice(len(PATTERN_MIX), p=probs / probs.sum()))][0]


def _random_look(rng: np.random.Generator, category: str) -> Look:
    return Look(category, COLOURS[int(rng.integers(len(COLOURS)))], _draw_tags(rng), int(rng.integers(2**31)))


def _random_pose(rng: np.random.Generator, width: int, height: int) -> Pose:
    scale = float(rng.uniform(0.7, 1.0))
    short = min(width, height)
    room = max(0.0, (0.5 - 0.45 * scale) * short * 0.8)
    return Pose(cx=width / 2 + float(rng.uniform(-room, room)), cy=height / 2 + float(rng.uniform(-room, room)),
                scale=scale, angle=float(rng.uniform(-12, 12)), flip=bool(rng.random() < 0.5),
                background=int(rng.integers(len(BACKGROUNDS))), light=float(rng.uniform(0.9, 1.05)))


# ----------------------------------------------------------------------------- rendering

def _garment_mask(category: str, pose: Pose, width: int, height: int, ss: int = 2) -> np.ndarray:
    """Anti-aliased float mask in [0, 1] of the posed silhouette (drawn at ``ss``x, box-reduced)."""
    im = Image.new("L", (width * ss, height * ss), 0)
    draw = ImageDraw.Draw(im)
    a = math.radians(pose.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    px = 0.45 * pose.scale * min(width, height)
    for pts, fill in _shape_ops(category):
        p = np.asarray(pts, dtype=np.float64)
        if pose.flip:
            p[:, 0] = -p[:, 0]
        p = (p @ rot.T) * px + (pose.cx, pose.cy)
        draw.polygon([tuple(q) for q in (p * ss)], fill=fill)
    return np.asarray(im.reduce(ss), dtype=np.float32) / 255.0


def _hard(x: np.ndarray, sharp: float = 3.0) -> np.ndarray:
    """A cosine wave turned into soft-edged bands in [0, 1]."""
    return np.clip(x * sharp + 0.5, 0.0, 1.0)


def _pattern_maps(look: Look, width: int, height: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(coverage map in [0, 1], RGB colour, opacity) for each pattern tag of the look."""
    rng = np.random.default_rng(look.pattern_seed)
    period = min(width, height) * float(rng.uniform(0.05, 0.09))
    base = np.array(PALETTE[look.colour], np.float32)
    contrast = [np.array(c, np.float32) for c in PALETTE.values() if abs(_lum(c) - _lum(base)) > 70]
    accent = contrast[int(rng.integers(len(contrast)))]
    dot_colour = np.array((250, 250, 250) if _lum(base) < 150 else (28, 28, 30), np.float32)
    angle = float(rng.uniform(0, math.pi))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    out = []
    if "striped" in look.tags:
        out.append((_hard(np.cos(2 * np.pi * u / period)), accent, 0.8))
    if "checked" in look.tags:
        w = 2 * np.pi / (period * 1.4)
        out.append(((_hard(np.cos(w * u)) + _hard(np.cos(w * v))) / 2, accent, 0.85))
    if "dotted" in look.tags:
        out.append((_dots(u, v, period * 1.5), dot_colour, 0.9))
    return out


def _dots(u: np.ndarray, v: np.ndarray, spacing: float) -> np.ndarray:
    """Anti-aliased dots on a hexagonal lattice of ``spacing`` pixels."""
    row_h = spacing * 0.866
    row = np.round(v / row_h)
    shift = (row % 2) * spacing / 2
    du = u - shift - np.round((u - shift) / spacing) * spacing
    dv = v - row * row_h
    return np.clip(spacing * 0.27 - np.hypot(du, dv) + 0.5, 0.0, 1.0)


def _lum(c) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _background(rng: np.random.Generator, pose: Pose, width: int, height: int) -> np.ndarray:
    """Plain background colour with a faint gradient and sensor-like noise."""
    base = np.array(BACKGROUNDS[pose.background], np.float32)
    grad = np.linspace(1.0, float(rng.uniform(0.94, 1.0)), height, dtype=np.float32)[:, None, None]
    noise = rng.standard_normal((height, width, 1), dtype=np.float32) * float(rng.uniform(1.5, 4.0))
    return base * grad + noise


def _shadow(mask: np.ndarray, width: int) -> np.ndarray:
    """A soft drop shadow of the garment mask, offset down-right."""
    off = max(1, width // 50)
    m = np.zeros_like(mask)
    m[off:, off:] = mask[:-off, :-off]
    im = Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(max(1, width // 60)))
    return np.asarray(im, np.float32) / 255.0


def _edge(mask: np.ndarray) -> np.ndarray:
    """The garment outline: mask minus its erosion by a 3x3 cross."""
    p = np.pad(mask, 1)
    eroded = np.minimum(np.minimum(p[:-2, 1:-1], p[2:, 1:-1]), np.minimum(p[1:-1, :-2], p[1:-1, 2:]))
    return mask - np.minimum(mask, eroded)


def render(look: Look, pose: Pose, rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw one photo; return (RGB uint8 array of shape (height, width, 3), garment mask in [0, 1])."""
    mask = _garment_mask(look.category, pose, width, height)
    bg = _background(rng, pose, width, height) * (1.0 - 0.22 * _shadow(mask, width))[..., None]
    shade = np.linspace(1.04, 0.9, height, dtype=np.float32)[:, None, None] * pose.light
    layer = np.array(PALETTE[look.colour], np.float32)
    for cover, colour, alpha in _pattern_maps(look, width, height):
        a = (cover * alpha)[..., None]
        layer = layer + (colour - layer) * a
    layer = layer * shade + rng.standard_normal((height, width, 1), dtype=np.float32) * 2.0
    layer *= (1.0 - 0.35 * _edge(mask))[..., None]
    m = mask[..., None]
    return np.clip(bg * (1.0 - m) + layer * m + 0.5, 0, 255).astype(np.uint8), mask


def render_photo(look: Look, rng: np.random.Generator, width: int,
                 height: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``look`` in a random pose drawn from ``rng``; return (RGB array, mask)."""
    height = height or width
    return render(look, _random_pose(rng, width, height), rng, width, height)


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=JPEG_QUALITY, **kw)
    return buf.getvalue()


# ----------------------------------------------------------------------------- tables

def _title(rng: np.random.Generator, look: Look) -> str:
    """A product title from colour, pattern, material and category; sometimes partial or empty."""
    if rng.random() < 0.10:
        return ""
    words = []
    if rng.random() < 0.85:
        words.append(look.colour)
    if look.tags != ("solid",) and rng.random() < 0.75:
        words += [_pick(rng, _PATTERN_WORDS[t]) for t in look.tags]
    elif look.tags == ("solid",) and rng.random() < 0.2:
        words.append("plain")
    if rng.random() < 0.7:
        words.append(_pick(rng, _MATERIALS[DEPARTMENT_OF[look.category]]))
    words.append(_pick(rng, _NOUNS[look.category]))
    text = " ".join(words)
    return text[0].upper() + text[1:]


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _split_labels(categories: list[str], rng: np.random.Generator) -> list[str]:
    """train/val/test per product, ~70/15/15 overall and within each category.

    Products are shuffled within their category, categories laid end to end, and each
    position takes the split furthest behind its target share (error diffusion), so any
    run of ~7 consecutive products holds a val and a test one.
    """
    order = []
    for cat in CATEGORIES:
        idx = [i for i, c in enumerate(categories) if c == cat]
        rng.shuffle(idx)
        order += idx
    out = [""] * len(categories)
    counts = {s: 0 for s, _ in SPLIT_FRACTIONS}
    for k, i in enumerate(order):
        split = max(SPLIT_FRACTIONS, key=lambda sf: sf[1] * (k + 1) - counts[sf[0]])[0]
        counts[split] += 1
        out[i] = split
    return out


def _products(n_products: int, seed: int) -> list[dict]:
    """Product-level records: product_id, look, title, split; categories balanced to within one."""
    rng = np.random.default_rng([seed, 0])
    cats = [CATEGORIES[i] for i in rng.permutation(np.resize(np.arange(len(CATEGORIES)), n_products))]
    splits = _split_labels(cats, rng)
    width = len(str(max(n_products - 1, 0)))
    out = []
    for p, (cat, split) in enumerate(zip(cats, splits)):
        look = _random_look(rng, cat)
        out.append({"product_id": f"P{p:0{max(width, 4)}d}", "look": look, "title": _title(rng, look), "split": split})
    return out


def _row(image_id: str, prod: dict) -> tuple[dict, dict]:
    look = prod["look"]
    row = {"id": image_id, "product_id": prod["product_id"], "department": DEPARTMENT_OF[look.category],
           "category": look.category, "colour": look.colour, "title": prod["title"], "split": prod["split"]}
    tags = {"id": image_id, **{t: int(t in look.tags) for t in TAGS}}
    return row, tags


def _write_tables(out: Path, rows: list[dict], tag_rows: list[dict]) -> None:
    cols = ["id", "product_id", "department", "category", "colour", "title", "split"]
    pd.DataFrame(rows, columns=cols).to_csv(out / "products.csv", index=False, lineterminator="\n")
    pd.DataFrame(tag_rows, columns=["id", *TAGS]).to_csv(out / "tags.csv", index=False, lineterminator="\n")
    (out / "dataset.yaml").write_text(DATASET_YAML)


# ----------------------------------------------------------------------------- broken files

def _bad_file_bytes(kind: str, look: Look, rng: np.random.Generator, size: int) -> bytes | None:
    """The bytes written for one broken / awkward file (None: write nothing)."""
    if kind == "missing":
        return None
    if kind == "empty":
        return b""
    if kind == "not_an_image":
        return b"this is not an image, just text with a .jpg name\n"
    if kind == "exif_rotated":  # a portrait photo stored landscape, EXIF orientation 6 = rotate 90 CW to view
        arr, _ = render_photo(look, rng, size, round(size * 1.25))
        exif = Image.Exif()
        exif[0x0112] = 6
        stored = np.ascontiguousarray(np.rot90(arr, 1))  # counter-clockwise: viewer turns it back
        return _jpeg_bytes(stored, exif=exif.tobytes())
    arr, mask = render_photo(look, rng, size)
    buf = io.BytesIO()
    if kind == "truncated":
        full = _jpeg_bytes(arr)
        return full[: len(full) // 2]
    if kind == "cmyk":
        Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif kind == "rgba":  # a cut-out: transparent outside the garment, PNG bytes under a .jpg name
        alpha = (mask * 255 + 0.5).astype(np.uint8)
        Image.fromarray(np.dstack([arr, alpha]), "RGBA").save(buf, "PNG")
    elif kind == "gray16":
        grey = np.asarray(Image.fromarray(arr).convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(buf, "PNG")
    else:
        raise ValueError(f"unknown bad-file kind '{kind}'")
    return buf.getvalue()


def _write_bad_files(out: Path, seed: int, first: int, width: int, size: int) -> tuple[list, list, dict]:
    """Append one broken row per kind of :data:`BAD_KINDS`; the rows stay in the tables."""
    rng = np.random.default_rng([seed, 3])
    rows, tag_rows, which = [], [], {}
    for k, kind in enumerate(BAD_KINDS):
        look = _random_look(rng, CATEGORIES[k % len(CATEGORIES)])
        image_id = f"{first + k:0{width}d}"
        prod = {"product_id": f"PBAD{k:02d}", "look": look, "title": _title(rng, look), "split": "train"}
        data = _bad_file_bytes(kind, look, np.random.default_rng([seed, 4, k]), size)
        if data is not None:
            (out / "images" / f"{image_id}.jpg").write_bytes(data)
        row, tags = _row(image_id, prod)
        rows.append(row)
        tag_rows.append(tags)
        which[kind] = image_id
    return rows, tag_rows, which


# ----------------------------------------------------------------------------- public API

def make_catalogue(out_dir: str | Path, n_products: int = 240, photos_per_product: int = 1, size: int = 160,
                   seed: int = 0, bad_files: bool = False) -> Path:
    """Write a synthetic catalogue and return the path of its dataset file (dataset.yaml).

    ``out_dir`` receives ``images/<id>.jpg`` (JPEG quality 90, ``size`` x ``size``),
    ``products.csv`` (id, product_id, department, category, colour, title, split),
    ``tags.csv`` (id, striped, checked, dotted, solid as 0/1) and ``dataset.yaml``.
    Splits are ~70/15/15 by product (and within each category); every photo of a
    product varies pose, background and lighting. With ``bad_files=True`` eight extra
    rows point at a missing, empty, truncated, non-image, CMYK, RGBA-PNG, 16-bit grey
    PNG and EXIF-rotated file; ``bad_files.json`` maps each kind to its id.
    """
    if n_products < 1 or photos_per_product < 1 or size < 16:
        raise ValueError("n_products and photos_per_product must be >= 1 and size >= 16")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_images = n_products * photos_per_product + (len(BAD_KINDS) if bad_files else 0)
    width = max(5, len(str(n_images - 1)))
    rows, tag_rows = [], []
    for p, prod in enumerate(_products(n_products, seed)):
        for k in range(photos_per_product):
            index = p * photos_per_product + k
            image_id = f"{index:0{width}d}"
            arr, _ = render_photo(prod["look"], np.random.default_rng([seed, 1, index]), size)
            (out / "images" / f"{image_id}.jpg").write_bytes(_jpeg_bytes(arr))
            row, tags = _row(image_id, prod)
            rows.append(row)
            tag_rows.append(tags)
    if bad_files:
        bad_rows, bad_tags, which = _write_bad_files(out, seed, len(rows), width, size)
        rows += bad_rows
        tag_rows += bad_tags
        (out / "bad_files.json").write_text(json.dumps(which, indent=2) + "\n")
    _write_tables(out, rows, tag_rows)
    return out / "dataset.yaml"


def make_folder_dataset(out_dir: str | Path, n_per_class: int = 20, size: int = 128, seed: int = 0,
                        splits: bool = True) -> Path:
    """Write ROOT/{train,val,test}/<class>/<img>.jpg (or ROOT/<class>/ when splits=False); returns ROOT.

    ROOT is ``out_dir``; the class is the category (same drawings as :func:`make_catalogue`).
    Each class gets ``n_per_class`` images, split ~70/15/15 within the class.
    """
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    root = Path(out_dir)
    for c, cat in enumerate(CATEGORIES):
        split_of = _split_labels([cat] * n_per_class, np.random.default_rng([seed, 5, c]))
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, 2, c, i])
            arr, _ = render_photo(_random_look(rng, cat), rng, size)
            folder = root / split_of[i] / cat if splits else root / cat
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{cat}_{i:04d}.jpg").write_bytes(_jpeg_bytes(arr))
    return root

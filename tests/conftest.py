"""Shared fixtures: offline mode, a private cache, real data when present, small image sets."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CATALENS_NO_MALLOC_TUNING", "1")

SHARED = Path(os.environ.get("CATALENS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    os.environ["CATALENS_CACHE"] = str(tmp_path_factory.mktemp("catalens-cache"))
    yield


@pytest.fixture(autouse=True)
def _catalens_logging_restored():
    """The CLI's ``setup_logging`` (every in-process ``main([...])``) gives the ``catalens`` logger its stderr
    handler, a level and ``propagate = False``; put them back after each test, so that whether a later
    test's ``caplog`` sees the library's records does not depend on which tests ran before it. A test of
    what a command prints reads its stderr (``capsys``)."""
    log = logging.getLogger("catalens")
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    log.handlers[:] = handlers
    log.setLevel(level)
    log.propagate = propagate


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "clothing-small").exists():
        pytest.skip(f"real benchmark photos not found at {SHARED} (set CATALENS_SHARED_DATA)")
    return SHARED


def jpeg_bytes(color=(200, 30, 30), size=(96, 128), pattern: int = 0, mode="RGB", fmt="JPEG", **save) -> bytes:
    """A small photo-like picture: coloured block with stripes when ``pattern``."""
    rng = np.random.default_rng(sum(color) + pattern)
    a = np.full((size[1], size[0], 3), 235, np.uint8)
    a[size[1] // 5: -size[1] // 5, size[0] // 5: -size[0] // 5] = color
    if pattern:
        a[::pattern * 4, :, :] = 20
    a = np.clip(a.astype(int) + rng.integers(-8, 8, a.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(a, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """ROOT/{train,val,test}/{red,blue}/*.jpg: two visually distinct classes."""
    root = tmp_path / "photos"
    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        for cls, col in (("red", (210, 30, 30)), ("blue", (30, 40, 210))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{cls}{i}.jpg").write_bytes(jpeg_bytes(col, pattern=i % 3))
    return root


def real_photo_table(tmp_path: Path, n_train: int, n_val: int, classes=("dress", "hat", "shoes")) -> tuple[Path, list[dict]]:
    """``(dataset yaml, rows)``: the first ``n_train`` / ``n_val`` clothing-small photos of each of
    ``classes`` as a table (id, path, split, label); skips without the real photos."""
    import pandas as pd

    root = SHARED / "clothing-small"
    if not root.exists():
        pytest.skip(f"real photos not found at {root} (set CATALENS_SHARED_DATA)")
    rows = [{"id": f.stem, "path": str(f), "split": split, "label": c}
            for folder, split, n in (("train", "train", n_train), ("validation", "val", n_val))
            for c in classes for f in sorted((root / folder / c).glob("*.jpg"))[:n]]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.yaml").write_text("table: d.csv\nimage: path\nid: id\nsplit: split\n"
                                     "tasks:\n  label: {kind: class}\n")
    return tmp_path / "d.yaml", rows

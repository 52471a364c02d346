"""Shared fixtures: offline mode, a private cache, real data when present, small image sets."""
from __future__ import annotations

import importlib.util
import io
import logging
import os
from pathlib import Path


def _pin_xdist_worker() -> None:
    """Under ``pytest -n N`` give each worker its own share of the CPUs, before numpy or torch
    size their thread pools from them: N workers of 2 threads each on 2 cores would spin on each other."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and 1 < count <= len(cpus):
        try:
            os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])
        except OSError:  # not permitted here: the workers share the CPUs
            pass


_pin_xdist_worker()

import numpy as np  # noqa: E402  (after the pinning)
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

#: tests that embed the same clothing-small photos with the default Lite0: one xdist worker runs them in turn, so
#: all but the first read the features from that worker's embedding cache (each worker has its own)
SAME_EMBEDDINGS = ("test_audit.py::test_flipped_labels_of_real_photos_are_found",
                   "test_decisions.py::test_real_photos_auto_accept_holds_on_test_and_unknown_keeps_95_percent",
                   "test_shared_data.py::test_real_photos_train_and_evaluate")
#: the test files that took longest on one worker, longest first (`pytest --durations=0`): xdist hands them
#: out first, so that no long one starts last and runs alone at the end
LONGEST_FIRST = ("clothing-small-lite0", "test_presets.py", "test_ray.py", "test_kfold_search.py", "test_export.py",
                 "test_parity.py", "test_decisions.py", "test_ensemble.py", "test_finetune.py", "test_web_page.py")


def _group(nodeid: str) -> str:
    """The xdist work unit of a test: its file, or ``clothing-small-lite0`` for :data:`SAME_EMBEDDINGS`."""
    file, _, name = nodeid.partition("::")
    file = file.rsplit("/", 1)[-1]
    return "clothing-small-lite0" if f"{file}::{name.split('[')[0]}" in SAME_EMBEDDINGS else file


if importlib.util.find_spec("xdist"):
    def pytest_xdist_auto_num_workers(config):
        """``-n auto``: one worker per CPU this process may use, at most one per 4 GiB of memory (the largest
        process of a whole run, CLI and Ray children included, held 3.4 GiB: /usr/bin/time, 2026-12-03)."""
        from catalens.runtime import available_cpus

        cpus = available_cpus()
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return cpus
        return max(1, min(cpus, memory // (4 << 30)))

    def pytest_xdist_make_scheduler(config, log):
        """``pytest -n N`` (pyproject's addopts): a test file runs in one worker, as ``--dist loadfile`` (its
        module fixtures are built once), and :data:`SAME_EMBEDDINGS` in one worker too. (xdist's own
        ``loadgroup`` renames node ids, which pytest 9.2 no longer reads.)"""
        from xdist.scheduler import LoadScopeScheduling

        class ByFile(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return _group(nodeid)

        return ByFile(config, log)


def pytest_collection_modifyitems(config, items):
    """In an xdist worker: the units of :data:`LONGEST_FIRST` first, in that order (every worker collects
    alike; with ``--no-loadscope-reorder`` xdist hands units out in this order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_group(item.nodeid), len(rank)))  # stable: collection order otherwise


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

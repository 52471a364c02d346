"""BSON dump source: indexing and streaming speed, memory at 10% and 100% of a ~1 GB dump.

Generates a Cdiscount-like dump (``{_id, category_id, imgs: [{picture}]}``, 1-4 pictures
per product, one ~30 KB JPEG reused) in a temporary folder, then measures

- building the index (framing + top-level parse, no picture bytes copied), hot page cache
  and after evicting the dump from the page cache (``posix_fadvise DONTNEED``),
- the same index built with pymongo's ``bson.decode_file_iter`` (full decode), for comparison,
- streaming every picture's bytes (``iter_pictures``; JPEG decoding excluded),
- random access through the catalogue reader, and opening the catalogue cold / from the sidecar,

with the process RSS when 10% and 100% of the file has been read. Run:
``.venv/bin/python benchmarks/bench_bson.py [--gb 1.0]``. The dump is deleted at the end.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

import bson  # noqa: E402

from catalens.ingest import bson_source as bs  # noqa: E402

MB = 1024 * 1024
PROC = psutil.Process()


def realistic_jpeg(target_kb: int = 30) -> bytes:
    """A product-photo-like JPEG of about ``target_kb`` KB (smooth shapes + sensor noise)."""
    rng = np.random.default_rng(0)
    h = w = 360
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 80 * np.sin(x / 37), 140 + 60 * np.cos(y / 29), 160 + 50 * np.sin((x + y) / 53)], -1)
    for q in range(60, 96, 3):
        img = np.clip(base + rng.normal(0, 9, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q)
        if buf.tell() >= target_kb * 1024:
            break
    return buf.getvalue()


def generate(path: Path, gb: float, jpeg: bytes) -> int:
    """Write documents until the dump reaches ``gb`` GB; return the number of documents."""
    rng = random.Random(0)
    target, size, n = gb * 1e9, 0, 0
    with open(path, "wb", buffering=8 * MB) as f:
        while size < target:
            doc = {"_id": 1_000_000 + n, "category_id": 1000010000 + rng.randrange(5270),
                   "imgs": [{"picture": jpeg}] * rng.randint(1, 4)}
            data = bson.encode(doc)
            f.write(data)
            size += len(data)
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def evict(path: Path) -> None:
    """Drop the dump's pages from the page cache (this file only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Memory:
    """RSS when the pass reaches 10% and 100% of the file, and the peak (ru_maxrss) by then."""

    def __init__(self, total: int) -> None:
        self.total, self.at = total, {}

    def __call__(self, done: int, total: int | None = None) -> None:
        for mark in (0.1, 1.0):
            if mark not in self.at and done >= mark * self.total:
                self.at[mark] = (PROC.memory_info().rss / MB, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def cells(self) -> list:
        return [round(self.at[m][0]) for m in (0.1, 1.0)] + [round(max(self.at[1.0]))]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


REPEATS = 2  # each streaming pass runs this often; the fastest run is reported


def measure(label: str, run, size: int, before=None) -> list:
    """Best of ``REPEATS`` runs of ``run(mem) -> documents``; a table row with its memory marks."""
    best = None
    for _ in range(REPEATS):
        if before is not None:
            before()
        mem = Memory(size)
        n, s = timed(lambda: run(mem))
        if best is None or s < best[1]:
            best = (n, s, mem)
    n, s, mem = best
    return [label, n, round(n / s), round(size / MB / s), round(s, 2), *mem.cells()]


def bench_index(path: Path, size: int, cold: bool, struct_parser: bool = False) -> list:
    """``bs.scan`` as ``build_index`` runs it (C bson.decode when present), or with the struct parser."""
    real = bs.fast_decoder
    how = "struct parser, no pymongo" if struct_parser or real() is None else "C bson.decode"
    label = f"build index: framing + {how}" + (" (cold cache)" if cold else " (hot cache)")
    if struct_parser:
        bs.fast_decoder = lambda: None
    try:
        return measure(label, lambda mem: len(bs.scan(path, progress=mem).frame), size,
                       before=(lambda: evict(path)) if cold else None)
    finally:
        bs.fast_decoder = real


def bench_decode_iter(path: Path, size: int) -> list:
    def run(mem):
        n = 0
        with open(path, "rb") as f:
            for doc in bson.decode_file_iter(f):
                _ = (doc["_id"], doc.get("category_id"), len(doc["imgs"]))
                n += 1
                if n % 500 == 0:
                    mem(f.tell())
        mem(size)
        return n
    return measure("for reference: pymongo's bson.decode_file_iter, same fields", run, size)


def bench_stream(path: Path, size: int) -> list:
    def run(mem):
        docs, last = 0, -1
        for p in bs.iter_pictures(path):
            if p.offset != last:
                docs, last = docs + 1, p.offset
                if docs % 500 == 0:
                    mem(p.offset)
            _ = len(p.data)
        mem(size)
        return docs
    return measure("stream every picture's bytes (iter_pictures)", run, size)


def bench_catalogue(path: Path) -> list[list]:
    src = bs.BsonSource()
    first, s1 = timed(lambda: src.load(path))
    second, s2 = timed(lambda: src.load(path))
    assert second.meta["index_from_cache"] and second.frame.equals(first.frame)
    refs = random.Random(1).sample(list(first.frame["path"]), min(2000, len(first)))
    reader = first.reader
    _, s3 = timed(lambda: [reader(r) for r in refs])
    n = first.meta["documents"]
    return [["open catalogue, no sidecar (scan + write index)", n, round(n / s1), "", round(s1, 2), "", "", ""],
            ["open catalogue again (sidecar reused)", n, round(n / s2), "", round(s2, 2), "", "", ""],
            [f"random picture reads via BsonReader ({len(refs)} pictures)", len(refs), round(len(refs) / s3),
             "", round(s3, 2), "", "", ""]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="dump size in GB (default 1)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-bson-"))
    try:
        jpeg = realistic_jpeg()
        path = tmp / "train.bson"
        load = os.getloadavg()[0]
        n_docs, s_gen = timed(lambda: generate(path, args.gb, jpeg))
        size = path.stat().st_size
        print(f"generated {n_docs} documents, {size / MB:.0f} MiB in {s_gen:.1f}s (JPEG {len(jpeg) / 1024:.1f} KiB)")
        rows = []
        sum(1 for _ in bs.iter_raw(path))  # warm-up, untimed
        rows.append(bench_index(path, size, cold=False))
        rows.append(bench_index(path, size, cold=True))
        rows.append(bench_index(path, size, cold=False, struct_parser=True))
        rows.append(bench_decode_iter(path, size))
        rows.append(bench_stream(path, size))
        rows += bench_catalogue(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = ["pass", "documents", "documents/s", "MiB/s", "seconds", "RSS at 10% (MiB)", "RSS at 100% (MiB)",
            "peak RSS (MiB)"]
    body = (f"Dump: {n_docs} documents, {size / MB:.0f} MiB, 1-4 pictures per document "
            f"(one {len(jpeg) / 1024:.1f} KiB JPEG reused). Target: >= 2,000 documents/s with flat memory. "
            f"Hot cache: the dump was just written and sits in the page cache; cold: evicted with "
            f"posix_fadvise(DONTNEED) first. Streaming passes: best of {REPEATS} runs. RSS is the whole benchmark process (numpy, pandas, pyarrow "
            f"loaded); peak RSS is ru_maxrss so far. Two shared cores (load average {load:.1f} at start): expect large variation between runs.\n\n"
            + table(head, rows))
    write_section("bench_bson", "BSON dump: index and streaming", body)


if __name__ == "__main__":
    main()

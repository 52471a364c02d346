"""Finding duplicates: content hashes for exact copies, embedding cosine for near copies.

Exact duplicates share the same bytes (:func:`catalens.embed.cache.content_hash`, the
embedding cache's key). Near duplicates are found among the *distinct* contents only (one
representative per exact group): features are L2-normalised and compared tile by tile
(``block`` x ``block`` matrix products), so memory stays at a few ``block``-sized tiles
whatever the catalogue size; pairs at or above the threshold are joined into groups
(connected components, union-find). The work is O(n^2 d): ~2 min for 50k distinct images
on 2 AVX2 cores; beyond a few hundred thousand, use an approximate-neighbour index.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from catalens.embed.cache import content_hash


@dataclass
class HashResult:
    """Per row: content hash (None when the bytes could not be read) and the read problem."""

    keys: list[str | None]
    problems: dict[int, str]     # row -> "missing: ..." / "empty: ..."
    sizes: np.ndarray            # bytes per row (0 when unreadable)


def _hash_one(reader, path: str) -> tuple[str | None, str | None, int]:
    try:
        data = reader(path)
    except FileNotFoundError:
        return None, f"missing: no file at '{path}'", 0
    except (IsADirectoryError, PermissionError, OSError) as e:
        return None, f"missing: cannot read '{path}': {e}", 0
    if not data:
        return None, "empty: 0 bytes", 0
    return content_hash(data), None, len(data)


def hash_rows(paths: list[str], reader, threads: int = 8, chunk: int = 4096) -> HashResult:
    """Content hash of every path (threads: file reads and blake2b release the GIL)."""
    keys: list[str | None] = []
    problems: dict[int, str] = {}
    sizes = np.zeros(len(paths), dtype=np.int64)
    with ThreadPoolExecutor(max(1, threads)) as ex:
        for s in range(0, len(paths), chunk):
            part = paths[s:s + chunk]
            for i, (key, problem, size) in enumerate(ex.map(lambda p: _hash_one(reader, p), part)):
                keys.append(key)
                sizes[s + i] = size
                if problem:
                    problems[s + i] = problem
    return HashResult(keys, problems, sizes)


def exact_groups(keys: list[str | None]) -> list[list[int]]:
    """Rows sharing a content hash, groups of two or more, ordered by first row."""
    by: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            by.setdefault(k, []).append(i)
    return sorted((v for v in by.values() if len(v) > 1), key=lambda v: v[0])


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class TooManyPairs(ValueError):
    pass


def normalise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def similar_pairs(x: np.ndarray, threshold: float, block: int = 2048,
                  max_pairs: int = 5_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``i < j`` of rows of ``x`` (L2-normalised) with cosine >= ``threshold``.

    Tiles of ``block`` x ``block`` (upper triangle only): peak memory is one tile
    (``block**2 * 4`` bytes, 16 MiB at 2048) plus the pairs found. Raises
    :class:`TooManyPairs` past ``max_pairs`` (the threshold is too low to mean "duplicate").
    """
    n = len(x)
    out_i, out_j, out_s = [], [], []
    total = 0
    for a in range(0, n, block):
        xa = x[a:a + block]
        for b in range(a, n, block):
            s = xa @ x[b:b + block].T
            hit = s >= threshold
            if a == b:
                hit = np.triu(hit, k=1)
            ii, jj = np.nonzero(hit)
            if ii.size:
                total += ii.size
                if total > max_pairs:
                    raise TooManyPairs(f"more than {max_pairs:,} pairs reach cosine {threshold}: the threshold is "
                                       f"too low to mean 'near duplicate' (try 0.95 or higher)")
                out_i.append(ii + a)
                out_j.append(jj + b)
                out_s.append(s[ii, jj])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_s).astype(np.float32))


def components(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components of size >= 2 of the graph with edges ``(i[k], j[k])``."""
    uf = UnionFind(n)
    for a, b in zip(i.tolist(), j.tolist()):
        uf.union(a, b)
    by: dict[int, list[int]] = {}
    for v in sorted(set(i.tolist()) | set(j.tolist())):
        by.setdefault(uf.find(v), []).append(v)
    return sorted((sorted(v) for v in by.values() if len(v) > 1), key=lambda v: v[0])

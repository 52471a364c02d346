"""On-disk embedding cache: features computed once per (image content, backbone, preprocessing).

Layout: ``CACHE_ROOT/<backbone fingerprint>[+simplejpeg]/part-NNNNN.keys.npy`` (content hashes, ``S32``) and
``part-NNNNN.emb.npy`` (float32 ``(n, dim)``). A part is written atomically, embeddings first
and keys last, so an interrupted run leaves only complete parts and resumes from them.
Reads memory-map the parts: opening a cache of millions of features costs only its keys.
Features decoded by libjpeg-turbo (simplejpeg) differ slightly from Pillow's (docs/engine.md), so
they live in their own folder (``+simplejpeg``): a cache filled before simplejpeg was installed is
never mixed with them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def content_hash(data: bytes) -> str:
    """Hash of image bytes (blake2b-128, hex): the cache key."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EmbeddingCache:
    """Append-only store of ``hash -> feature vector`` for one backbone fingerprint."""

    def __init__(self, root: str | Path, fingerprint: str, dim: int, flush_every: int = 1024,
                 jpeg: str = "auto") -> None:
        from catalens.ingest.images import jpeg_decoder

        self.decoder = jpeg_decoder(jpeg)   # the JPEG decoder whose features this cache holds
        self.dir = Path(root) / (fingerprint + ("+simplejpeg" if self.decoder == "simplejpeg" else ""))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self.flush_every = flush_every
        self._index: dict[str, tuple[int, int]] = {}
        self._parts: dict[int, np.ndarray] = {}
        self._pending_keys: list[str] = []
        self._pending_emb: list[np.ndarray] = []
        self._load_index()

    def _part_ids(self) -> list[int]:
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in self.dir.glob("part-*.keys.npy"))

    def _load_index(self) -> None:
        for pid in self._part_ids():
            keys = np.load(self.dir / f"part-{pid:05d}.keys.npy")
            for row, k in enumerate(keys):
                self._index[k.decode()] = (pid, row)

    def __len__(self) -> int:
        return len(self._index) + len(self._pending_keys)

    def __contains__(self, key: str) -> bool:
        return key in self._index or key in self._pending_set()

    def _pending_set(self) -> set[str]:
        return set(self._pending_keys)

    def keys(self) -> set[str]:
        return set(self._index) | self._pending_set()

    def add(self, keys: list[str], emb: np.ndarray) -> None:
        """Queue ``emb`` ``(n, dim)`` under ``keys``; flushed to disk every ``flush_every`` rows."""
        if emb.shape != (len(keys), self.dim):
            raise ValueError(f"embeddings of shape {emb.shape} for {len(keys)} keys, dim {self.dim}")
        self._pending_keys.extend(keys)
        self._pending_emb.append(np.asarray(emb, dtype=np.float32))
        if len(self._pending_keys) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write queued embeddings as a new part (atomic: embeddings, then keys)."""
        if not self._pending_keys:
            return
        pid = (self._part_ids() or [-1])[-1] + 1
        while (self.dir / f"part-{pid:05d}.keys.npy").exists():
            pid += 1
        emb = np.concatenate(self._pending_emb)
        keys = np.array([k.encode() for k in self._pending_keys], dtype="S32")
        _atomic_save(self.dir / f"part-{pid:05d}.emb.npy", emb)
        _atomic_save(self.dir / f"part-{pid:05d}.keys.npy", keys)
        for row, k in enumerate(self._pending_keys):
            self._index[k] = (pid, row)
        self._pending_keys, self._pending_emb = [], []

    def _part(self, pid: int) -> np.ndarray:
        if pid not in self._parts:
            self._parts[pid] = np.load(self.dir / f"part-{pid:05d}.emb.npy", mmap_mode="r")
        return self._parts[pid]

    def get(self, keys: list[str]) -> np.ndarray:
        """Features ``(len(keys), dim)`` float32 for keys that are all present."""
        self.flush()
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            pid, row = self._index[k]
            out[i] = self._part(pid)[row]
        return out

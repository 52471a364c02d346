"""On-disk embedding cache: features computed once per (image content, backbone, preprocessing).

Layout: ``CACHE_ROOT/<backbone fingerprint>[+simplejpeg][+bf16|+int8]/part-NNNNN.keys.npy`` (content
hashes, ``S32``) and ``part-NNNNN.emb.npy`` (float32 ``(n, dim)``). A part is written atomically, embeddings first
and keys last, so an interrupted run leaves only complete parts and resumes from them. Each part's number is
claimed first (``part-NNNNN.lock``, created exclusively), so two runs may fill one cache at once.
Reads memory-map the parts: opening a cache of millions of features costs only its keys.

Parts are checked when the cache is first used (opening it reads nothing): both files readable, the
feature file exactly as long as its header says, one row per key, ``dim`` columns, every value finite.
The finite-value scan runs once per part: ``verified.json`` records each checked part's size and
modification time, so a part changed afterwards (or never checked) is scanned again. A bad part is moved
to ``bad/`` with a warning naming the file and why, and its rows are recomputed by the run that opened the cache.

Features decoded by libjpeg-turbo (simplejpeg) differ slightly from Pillow's (docs/engine.md), so
they live in their own folder (``+simplejpeg``): a cache filled before simplejpeg was installed is
never mixed with them. Features computed by a lossy runtime (``bf16``, ``cuda-bf16``, ``openvino-int8``;
:func:`catalens.embed.runtimes.runtime_precision`) live in a folder of their precision (``+bf16``,
``+int8``): a run with such a runtime computes and reads its own features, and never hands them to an
fp32 run (training, evaluation) as fp32 ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VERIFIED = "verified.json"


class BadPart(Exception):
    """A cache part that cannot be trusted; the message says why."""


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
                 jpeg: str = "auto", precision: str = "fp32") -> None:
        from catalens.ingest.images import jpeg_decoder

        self.decoder = jpeg_decoder(jpeg)   # the JPEG decoder whose features this cache holds
        self.precision = precision          # the runtime precision whose features it holds (fp32, bf16, int8)
        self.root, self.fingerprint = Path(root), fingerprint
        self.dir = self.root / (fingerprint + ("+simplejpeg" if self.decoder == "simplejpeg" else "")
                                + ("" if precision == "fp32" else f"+{precision}"))
        self.dim = dim
        self.flush_every = flush_every
        self._loaded: dict[str, tuple[int, int]] | None = None   # the index, read (and checked) on first use
        self._parts: dict[int, np.ndarray] = {}
        self._pending_keys: list[str] = []
        self._pending_emb: list[np.ndarray] = []

    @property
    def _index(self) -> dict[str, tuple[int, int]]:
        """``key -> (part, row)`` of the parts on disk. Read on first use, so a cache that is opened and never
        used (the fp32 sibling of a lossy run's, :meth:`with_precision`) costs nothing and creates no folder."""
        if self._loaded is None:
            self._loaded = {}
            self._load_index()
        return self._loaded

    def with_precision(self, precision: str) -> "EmbeddingCache":
        """This cache when it holds ``precision``'s features, else the sibling cache that does (same
        root, backbone and decoder)."""
        if precision == self.precision:
            return self
        return EmbeddingCache(self.root, self.fingerprint, self.dim, self.flush_every, jpeg=self.decoder,
                              precision=precision)

    def _part_ids(self) -> list[int]:
        return sorted(int(p.name.split("-")[1].split(".")[0]) for p in self.dir.glob("part-*.keys.npy"))

    def _load_index(self) -> None:
        verified = self._read_verified()
        checked = {}
        for pid in self._part_ids():
            try:
                keys, stamp = self._check_part(pid, verified)
            except BadPart as e:
                self._set_aside(pid, str(e))
                continue
            checked[self._name(pid)] = stamp
            for row, k in enumerate(keys):
                self._index[k.decode()] = (pid, row)
        if checked != verified:
            self._write_verified(checked)

    @staticmethod
    def _name(pid: int) -> str:
        return f"part-{pid:05d}"

    def _check_part(self, pid: int, verified: dict) -> tuple[np.ndarray, list[int]]:
        """Keys of part ``pid`` and its (size, mtime) stamp; raises :class:`BadPart`."""
        kpath, epath = self.dir / f"{self._name(pid)}.keys.npy", self.dir / f"{self._name(pid)}.emb.npy"
        try:
            keys = np.load(kpath)
        except Exception as e:  # truncated header or body: ValueError, EOFError, OSError ...
            raise BadPart(f"keys file '{kpath.name}' is unreadable ({type(e).__name__}: {e})") from None
        if not epath.exists():
            raise BadPart(f"'{epath.name}' is missing")
        try:
            emb = np.load(epath, mmap_mode="r")
        except Exception as e:  # a truncated body: "mmap length is greater than file size"
            raise BadPart(f"'{epath.name}' is unreadable or shorter than its header says "
                          f"({type(e).__name__}: {e})") from None
        if keys.dtype.kind != "S":
            raise BadPart(f"keys file '{kpath.name}' holds {keys.dtype}, not content hashes (bytes)")
        if keys.ndim != 1 or emb.ndim != 2 or emb.shape != (len(keys), self.dim) or emb.dtype != np.float32:
            raise BadPart(f"'{epath.name}' holds {emb.dtype} {emb.shape} for {len(keys)} keys; "
                          f"expected float32 ({len(keys)}, {self.dim})")
        st = epath.stat()
        expected = _data_offset(epath) + emb.size * emb.itemsize
        if st.st_size != expected:
            raise BadPart(f"'{epath.name}' is {st.st_size} bytes; its header describes {expected}")
        stamp = [st.st_size, st.st_mtime_ns]
        if verified.get(self._name(pid)) != stamp:
            bad = _first_non_finite_row(emb)
            if bad is not None:
                raise BadPart(f"'{epath.name}' row {bad} holds non-finite values (NaN or inf)")
        return keys, stamp

    def _set_aside(self, pid: int, why: str) -> None:
        """Move both files of a bad part to ``bad/`` (never deleted), so its rows are recomputed."""
        bad_dir = self.dir / "bad"
        bad_dir.mkdir(exist_ok=True)
        suffix = time.strftime("%Y%m%dT%H%M%S")
        moved = []
        for kind in ("keys", "emb"):
            src = self.dir / f"{self._name(pid)}.{kind}.npy"
            if src.exists():
                dst = bad_dir / f"{src.name}.{suffix}-{os.getpid()}"
                try:
                    os.replace(src, dst)
                    moved.append(dst)
                except FileNotFoundError:  # another process set it aside first
                    pass
        log.warning("embedding cache part '%s' set aside: %s; moved to %s, its images will be embedded again",
                    self.dir / f"{self._name(pid)}.emb.npy", why, ", ".join(str(m) for m in moved) or "(gone)")

    def _read_verified(self) -> dict:
        try:
            data = json.loads((self.dir / VERIFIED).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_verified(self, stamps: dict) -> None:
        """Record the parts checked so far (atomic; a lost race only costs a re-scan)."""
        tmp = self.dir / f"{VERIFIED}.tmp{os.getpid()}"
        try:
            tmp.write_text(json.dumps(stamps, sort_keys=True))
            os.replace(tmp, self.dir / VERIFIED)
        except OSError as e:  # a read-only cache still works, it is just scanned again next time
            log.debug("could not record verified cache parts: %s", e)

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
        index = self._index   # read before the new part is on disk
        emb = np.concatenate(self._pending_emb)
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():  # never persist NaN/inf features: those images are embedded again next time
            log.warning("%d of %d new features are not finite (NaN or inf); not cached",
                        int((~finite).sum()), len(finite))
            self._pending_keys = [k for k, ok in zip(self._pending_keys, finite) if ok]
            emb = emb[finite]
            if not self._pending_keys:
                self._pending_emb = []
                return
        keys = np.array([k.encode() for k in self._pending_keys], dtype="S32")
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = self._claim_part()
        _atomic_save(self.dir / f"{self._name(pid)}.emb.npy", emb)
        _atomic_save(self.dir / f"{self._name(pid)}.keys.npy", keys)
        (self.dir / f"{self._name(pid)}.lock").unlink()
        for row, k in enumerate(self._pending_keys):
            index[k] = (pid, row)
        self._stamp(pid)
        self._pending_keys, self._pending_emb = [], []

    def _claim_part(self) -> int:
        """The next part number no other process writes: claimed by creating ``part-NNNNN.lock`` exclusively
        (removed once the part is written). Two runs filling one cache at once both took the next number free
        on disk, and one's keys could land beside the other's features. The keys file is looked for after the
        claim, so a number another run finished writing in the meantime is never taken again. A lock left by a
        crash only makes its number skipped."""
        pid = (self._part_ids() or [-1])[-1] + 1
        while True:
            lock = self.dir / f"{self._name(pid)}.lock"
            try:
                os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pid += 1
                continue
            if not (self.dir / f"{self._name(pid)}.keys.npy").exists():
                return pid
            lock.unlink()
            pid += 1

    def _stamp(self, pid: int) -> None:
        """Mark a part this process wrote from finite values as verified."""
        st = (self.dir / f"{self._name(pid)}.emb.npy").stat()
        stamps = self._read_verified()
        stamps[self._name(pid)] = [st.st_size, st.st_mtime_ns]
        self._write_verified(stamps)

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


def _data_offset(path: Path) -> int:
    """Bytes before the array data of a ``.npy`` file (magic + header)."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def _first_non_finite_row(emb: np.ndarray, chunk: int = 4096) -> int | None:
    """Index of the first row holding NaN or inf, scanning in chunks (bounded memory)."""
    for s in range(0, len(emb), chunk):
        ok = np.isfinite(emb[s:s + chunk]).all(axis=1)
        if not ok.all():
            return s + int(np.argmin(ok))
    return None

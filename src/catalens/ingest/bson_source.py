"""MongoDB BSON dump source (the Cdiscount format), streamed and indexed, never loaded whole.

A dump is a run of concatenated BSON documents, one per product::

    {_id: int, category_id: int, imgs: [{picture: <jpeg bytes>}, ...]}

``category_id`` is absent in test dumps. The dump is scanned once by reading each
4-byte little-endian length prefix and the body that follows (one document in memory at
a time), so memory stays flat. Each document is checked and its top-level fields read
with pymongo's C ``bson.decode`` when installed (measured faster than parsing in Python,
picture copies included), else with a :mod:`struct` parser that only locates the pictures.
The result, one row per document (byte offset, length, product id, category id, number
of pictures), is cached next to the dump as ``<dump>.index.parquet`` and reused while
the dump's size and mtime are unchanged.

Pictures are then read at random: picture ``k`` of the document at byte offset ``O`` of
dump ``D`` has the catalogue path ``"D::O:k"``, which :class:`BsonReader` (the
catalogue's picklable ``reader``) resolves with one ``pread`` per call.

Corrupt documents are skipped, counted and reported by byte offset in
``catalogue.meta["problems"]`` (and as ``corrupt_document`` lines of ``ingest/problems.csv``
through ``meta["source_problems"]``); a dump with no usable document at all is refused.
Pictures of products without a label belong to no split. See ``docs/bson.md``.

pymongo is optional: without it indexing and reading pictures use the :mod:`struct`
parser; :func:`iter_documents` and ids of unusual BSON types need it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd

from catalens.ingest.catalogue import Catalogue
from catalens.ingest.images import PROBLEM_FIXES
from catalens.ingest.sources import SOURCES
from catalens.tasks import TaskInfo

MIN_DOC_BYTES = 5                   # int32 length + terminating NUL
MAX_DOC_BYTES = 64 * 1024 * 1024    # larger length prefixes are taken as garbage
INDEX_VERSION = 1
INDEX_SUFFIX = ".index.parquet"
REF_SEP = "::"
READ_BUFFER = -1                    # the default: documents larger than it are read without a copy
SPLIT_CUTS = (("train", 80), ("val", 90), ("test", 100))   # cumulative percent of the product hash
SPLIT_RULE = "product_hash"
CATEGORY_TASK = "category"
LEVEL_TASKS = ("level1", "level2", "level3")
INDEX_COLUMNS = ["doc", "offset", "length", "product_id", "category_id", "n_imgs", "split"]

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_DOUBLE = struct.Struct("<d")
# BSON element types whose value has a fixed size
_FIXED_SIZE = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
               0x12: 8, 0x13: 16, 0x7F: 0, 0xFF: 0}
_STRING_TYPES = {0x02, 0x0D, 0x0E}          # int32 byte count (incl. NUL) + bytes
_SELF_SIZED = {0x03, 0x04, 0x0F}            # int32 total size first (document, array, code w/ scope)
_BINARY, _DOCUMENT, _ARRAY = 0x05, 0x03, 0x04


class CorruptDocument(ValueError):
    """A BSON document that cannot be used; the message says what is wrong with it."""


# ----------------------------------------------------------------------------- framing


class RawDocument(NamedTuple):
    """One framed document: its ordinal in the dump, byte offset and bytes (length prefix included)."""

    doc: int
    offset: int
    data: bytes


def problem(offset: int, text: str) -> dict:
    """A problem record as stored in ``meta["problems"]``."""
    return {"offset": int(offset), "problem": text}


def _framing_problem(offset: int, size: int, remaining: int) -> str | None:
    """Why a length prefix ``size`` at ``offset`` cannot start a document (``None`` when it can)."""
    if size < MIN_DOC_BYTES or size > MAX_DOC_BYTES:
        return (f"length prefix at offset {offset} says {size} bytes (expected {MIN_DOC_BYTES} .. "
                f"{MAX_DOC_BYTES} bytes): the dump cannot be resynchronised from here, so the last "
                f"{remaining} bytes were not read")
    if size > remaining:
        return f"document at offset {offset} claims {size} bytes, only {remaining} remain (truncated dump)"
    return None


def iter_raw(path: str | Path, problems: list[dict] | None = None) -> Iterator[RawDocument]:
    """Stream the documents of a dump as raw bytes, without decoding them.

    Reads the 4-byte length prefix, then the body, one document at a time (memory holds
    one document). A bad length prefix or a truncated tail ends the stream and is
    appended to ``problems`` (when given) as ``{"offset", "problem"}``; documents
    that are framed correctly are yielded even if their content is corrupt.
    """
    size = os.path.getsize(path)
    with open(path, "rb", buffering=READ_BUFFER) as f:
        offset, doc = 0, 0
        while offset < size:
            bad, data = _read_one(f, offset, size - offset)
            if bad:
                if problems is not None:
                    problems.append(problem(offset, bad))
                return
            yield RawDocument(doc, offset, data)
            offset += len(data)
            doc += 1


def _read_one(f: BinaryIO, offset: int, remaining: int) -> tuple[str | None, bytes]:
    """(problem, document bytes) for the document at the current position of ``f``."""
    head = f.read(4)
    if len(head) < 4:
        return (f"{len(head)} stray bytes at offset {offset}, too short for a length prefix "
                f"(truncated dump)"), b""
    (n,) = _INT32.unpack(head)
    bad = _framing_problem(offset, n, remaining)
    if bad:
        return bad, b""
    data = head + f.read(n - 4)
    if len(data) != n:  # the file shrank while reading
        return f"document at offset {offset} claims {n} bytes, only {len(data)} remain (truncated dump)", data
    return None, data


# ----------------------------------------------------------------------------- parsing


def _cstring_end(doc, start: int, end: int) -> int:
    nul = doc.find(b"\x00", start, end)
    if nul < 0:
        raise CorruptDocument("an element name runs past the end of its document")
    return nul


def _value_size(doc, t: int, v: int, end: int) -> int:
    """Bytes taken by the value of an element of type ``t`` starting at ``v``."""
    if t in _FIXED_SIZE:
        return _FIXED_SIZE[t]
    if v + 4 > end:
        raise CorruptDocument(f"an element of type 0x{t:02x} runs past the end of its document")
    (n,) = _INT32.unpack_from(doc, v)
    if t in _STRING_TYPES:
        size = 4 + n
    elif t in _SELF_SIZED:
        size = n
    elif t == _BINARY:
        size = 5 + n
    elif t == 0x0B:  # regex: two cstrings
        return _cstring_end(doc, _cstring_end(doc, v, end) + 1, end) + 1 - v
    elif t == 0x0C:  # DBPointer: string + ObjectId
        size = 4 + n + 12
    else:
        raise CorruptDocument(f"unknown BSON element type 0x{t:02x}")
    if n < 0 or (t in _SELF_SIZED and n < MIN_DOC_BYTES) or (t in _STRING_TYPES and n < 1):
        raise CorruptDocument(f"an element of type 0x{t:02x} has an impossible size {n}")
    return size


def _elements(doc, start: int, end: int) -> Iterator[tuple[int, bytes, int, int]]:
    """``(type, name, value_start, value_end)`` for each element of the (sub)document ``doc[start:end]``.

    Checks the structure (sizes inside bounds, terminating NUL) but decodes no values.
    """
    last = end - 1
    if end - start < MIN_DOC_BYTES or doc[last] != 0:
        raise CorruptDocument("a (sub)document does not end with a NUL byte (bad length?)")
    pos = start + 4
    while pos < last:
        t = doc[pos]
        nul = _cstring_end(doc, pos + 1, last)
        v = nul + 1
        vend = v + _value_size(doc, t, v, last)
        if vend > last:
            raise CorruptDocument(f"element {bytes(doc[pos + 1:min(nul, pos + 33)])!r} runs past the end "
                                  f"of its document")
        yield t, bytes(doc[pos + 1:nul]), v, vend
        pos = vend
    if pos != last:
        raise CorruptDocument("the elements do not end where the document length says")


def _subdocument(doc, t: int, v: int, vend: int, what: str) -> tuple[int, int]:
    if t not in (_DOCUMENT, _ARRAY):
        raise CorruptDocument(f"{what} is BSON type 0x{t:02x}, expected a document or array")
    (n,) = _INT32.unpack_from(doc, v)
    if v + n != vend:
        raise CorruptDocument(f"{what} has an inconsistent length")
    return v, vend


def _scalar(doc, t: int, v: int, vend: int, what: str):
    """Python value of a scalar element (ints, doubles, strings, ObjectId as hex, null)."""
    if t == 0x10:
        return _INT32.unpack_from(doc, v)[0]
    if t == 0x12:
        return _INT64.unpack_from(doc, v)[0]
    if t == 0x01:
        x = _DOUBLE.unpack_from(doc, v)[0]
        return int(x) if x.is_integer() else x
    if t == 0x02:
        try:
            return bytes(doc[v + 4:vend - 1]).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptDocument(f"{what} is not valid UTF-8") from None
    if t == 0x07:
        return bytes(doc[v:vend]).hex()
    if t == 0x0A:
        return None
    return _decoded_with_bson(doc, v, vend, t, what)


def _decoded_with_bson(doc, v: int, vend: int, t: int, what: str):
    """Rare value types (UUID, Decimal128, ...): let pymongo's bson decode them, as a string."""
    try:
        import bson
    except ImportError:
        raise CorruptDocument(f"{what} has BSON type 0x{t:02x}; reading it needs pymongo "
                              f"(pip install pymongo)") from None
    body = bytes([t]) + b"x\x00" + bytes(doc[v:vend])
    try:
        return str(bson.decode(_INT32.pack(len(body) + 5) + body + b"\x00")["x"])
    except Exception as e:  # noqa: BLE001 - bson raises several kinds
        raise CorruptDocument(f"{what} cannot be decoded: {e}") from None


def _picture_span(doc, k: int, v: int, vend: int) -> tuple[int, int]:
    """Byte range of the ``picture`` binary of ``imgs[k]``, the item at ``doc[v:vend]``."""
    for t, name, pv, pend in _elements(doc, v, vend):
        if name == b"picture":
            if t != _BINARY:
                raise CorruptDocument(f"imgs[{k}].picture is BSON type 0x{t:02x}, expected binary")
            start = pv + 5
            if doc[pv + 4] == 0x02:  # old binary subtype: an extra int32 length first
                start += 4
            return start, pend
    raise CorruptDocument(f"imgs[{k}] has no 'picture'")


_PICTURE_ONLY = b"\x05picture\x00"   # an item {picture: <binary>} starts with this after its length


def _plain_picture(doc, t: int, v: int, vend: int) -> tuple[int, int] | None:
    """Fast path for the usual item ``{picture: <binary subtype 0>}``; ``None`` when it is not one."""
    if t != _DOCUMENT or doc[v + 4:v + 13] != _PICTURE_ONLY or doc[v + 17] == 0x02:
        return None
    (size,) = _INT32.unpack_from(doc, v)
    (n,) = _INT32.unpack_from(doc, v + 13)
    start = v + 18
    if size != vend - v or n < 0 or start + n + 1 != vend or doc[vend - 1] != 0:
        return None
    return start, start + n


def _image_spans(doc, v: int, vend: int) -> list[tuple[int, int]]:
    """Picture byte ranges of every item of the ``imgs`` array at ``doc[v:vend]``."""
    spans = []
    for k, (t, _, iv, iend) in enumerate(_elements(doc, v, vend)):
        span = _plain_picture(doc, t, iv, iend) if iend - iv >= 19 else None
        if span is None:  # anything else: the general, checking walk
            span = _picture_span(doc, k, *_subdocument(doc, t, iv, iend, f"imgs[{k}]"))
        spans.append(span)
    return spans


class Slices:
    """The pictures of a parsed document: ``len()`` and ``[k]`` (bytes, copied only when asked)."""

    def __init__(self, doc, spans: list[tuple[int, int]]) -> None:
        self.doc, self.spans = doc, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, k: int) -> bytes:
        a, b = self.spans[k]
        return bytes(self.doc[a:b])


class DocFields(NamedTuple):
    """What the index keeps of a document, and its pictures.

    ``product_id`` and ``category_id`` are the values as stored (usually ``int``; strings,
    ObjectIds as hex); ``category_id`` is ``None`` when the document has none.
    """

    product_id: int | str
    category_id: int | str | float | None
    pictures: Sequence[bytes]


def _check_fields(pid, imgs) -> None:
    if pid is None:
        raise CorruptDocument("has no _id")
    if imgs is None:
        raise CorruptDocument("has no 'imgs' array")
    if not imgs:
        raise CorruptDocument("has an empty 'imgs' array (no pictures)")


def parse_document(doc) -> DocFields:
    """Top-level fields of one document (length prefix included) with :mod:`struct`, no pymongo.

    Pictures are located, not copied. Raises :class:`CorruptDocument` naming what is wrong:
    a broken structure, no ``_id``, no ``imgs`` array, an empty ``imgs`` or an image
    without a ``picture`` binary.
    """
    pid, cat, spans = None, None, None
    for t, name, v, vend in _elements(doc, 0, len(doc)):
        if name == b"_id":
            pid = _scalar(doc, t, v, vend, "_id")
        elif name == b"category_id":
            cat = _scalar(doc, t, v, vend, "category_id")
        elif name == b"imgs":
            spans = _image_spans(doc, *_subdocument(doc, t, v, vend, "imgs"))
    _check_fields(pid, spans)
    return DocFields(pid, cat, Slices(doc, spans))


@lru_cache(maxsize=1)
def fast_decoder() -> Callable[[bytes], dict] | None:
    """pymongo's C ``bson.decode`` when installed (about 1.5x faster here), else ``None``."""
    try:
        import bson
    except ImportError:
        return None
    has_c = getattr(bson, "has_c", None)  # also rules out the unrelated PyPI 'bson' package
    return bson.decode if has_c is not None and has_c() else None


def _plain(v):
    """A decoded id as the struct parser gives it: ints, integral floats as int, ObjectIds as hex."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) and v is not None:
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _decoded_fields(d: dict) -> DocFields:
    imgs = d.get("imgs")
    if isinstance(imgs, dict):
        imgs = list(imgs.values())
    elif imgs is not None and not isinstance(imgs, list):
        raise CorruptDocument(f"imgs is {type(imgs).__name__}, expected a document or array")
    _check_fields(d.get("_id"), imgs)
    pictures = []
    for k, img in enumerate(imgs):
        if not isinstance(img, dict):
            raise CorruptDocument(f"imgs[{k}] is {type(img).__name__}, expected a document or array")
        if "picture" not in img:
            raise CorruptDocument(f"imgs[{k}] has no 'picture'")
        if not isinstance(img["picture"], bytes):
            raise CorruptDocument(f"imgs[{k}].picture is {type(img['picture']).__name__}, expected binary")
        pictures.append(bytes(img["picture"]))
    return DocFields(_plain(d["_id"]), _plain(d.get("category_id")), pictures)


def read_document(doc: bytes, decode: Callable[[bytes], dict] | None = None) -> DocFields:
    """Fields and pictures of one document, with ``decode`` (e.g. :func:`fast_decoder`) or :mod:`struct`.

    Both ways apply the same rules and raise :class:`CorruptDocument`; ``bson.decode``
    also checks every value (UTF-8 of all strings, ...).
    """
    if decode is None:
        return parse_document(doc)
    try:
        d = decode(doc)
    except Exception as e:  # noqa: BLE001 - InvalidBSON, InvalidStringData, ...
        raise CorruptDocument(f"undecodable BSON: {e}") from None
    return _decoded_fields(d)


# ----------------------------------------------------------------------------- streaming


class Picture(NamedTuple):
    """One picture met while streaming a dump."""

    offset: int              # byte offset of its document
    k: int                   # position in the document's ``imgs``
    product_id: str
    category_id: str | None
    data: bytes


def iter_pictures(path: str | Path, problems: list[dict] | None = None) -> Iterator[Picture]:
    """Stream every picture of a dump in file order, skipping (and reporting) corrupt documents."""
    decode = fast_decoder()
    for raw in iter_raw(path, problems):
        try:
            f = read_document(raw.data, decode)
        except CorruptDocument as e:
            if problems is not None:
                problems.append(problem(raw.offset, f"document {raw.doc} at offset {raw.offset}: {e}"))
            continue
        pid, cat = str(f.product_id), _str_or_none(f.category_id)
        for k in range(len(f.pictures)):
            yield Picture(raw.offset, k, pid, cat, f.pictures[k])


def iter_documents(path: str | Path, problems: list[dict] | None = None) -> Iterator[tuple[int, dict]]:
    """Stream ``(offset, document)`` fully decoded with pymongo's ``bson.decode``.

    Slower than :func:`iter_pictures` (every value is decoded); for inspecting dumps.
    Undecodable documents are skipped and reported like framing problems.
    """
    import bson

    for raw in iter_raw(path, problems):
        try:
            yield raw.offset, bson.decode(raw.data)
        except Exception as e:  # noqa: BLE001 - bson raises InvalidBSON and friends
            if problems is not None:
                problems.append(problem(raw.offset, f"document {raw.doc} at offset {raw.offset}: {e}"))


# ----------------------------------------------------------------------------- index


@dataclass
class BsonIndex:
    """One row per usable document (``INDEX_COLUMNS``) and the problems met while scanning."""

    frame: pd.DataFrame
    problems: list[dict] = field(default_factory=list)
    documents_seen: int = 0           # framed documents, usable or not
    sidecar: str | None = None        # where the index is cached (None: could not write)
    from_cache: bool = False


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sidecar_paths(path: Path) -> list[Path]:
    """Where the index of ``path`` is cached: next to the dump, else in the user cache."""
    base = os.environ.get("CATALENS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "catalens")
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    return [path.with_name(path.name + INDEX_SUFFIX),
            Path(base) / "bson-index" / f"{path.stem}-{key}{INDEX_SUFFIX}"]


def _str_or_none(v) -> str | None:
    return None if v is None else str(v)


class _Column:
    """An index column kept as a compact int64 array while every value is an int (or None).

    Scanning millions of documents then costs ~9 bytes per value instead of a Python
    object each; the first non-int value turns the column into a plain list.
    """

    def __init__(self) -> None:
        self.ints: array | None = array("q")
        self.missing: bytearray | None = bytearray()
        self.objects: list | None = None

    def append(self, v) -> None:
        if self.objects is None:
            if type(v) is int and -(2**63) <= v < 2**63:
                self.ints.append(v)
                self.missing.append(0)
                return
            if v is None:
                self.ints.append(0)
                self.missing.append(1)
                return
            self.objects = self._values()
            self.ints = self.missing = None
        self.objects.append(v)

    def _values(self) -> list:
        return [None if m else i for i, m in zip(self.ints, self.missing)]

    def strings(self) -> pd.Series:
        """The values as strings (``None`` kept), as an object Series."""
        values = self.objects if self.objects is not None else self._values()
        cache: dict = {}  # repeated values (categories) share one string
        return pd.Series([None if v is None else cache.setdefault(v, str(v)) for v in values], dtype=object)


class _IndexBuilder:
    """Accumulates index rows in compact columns while scanning."""

    def __init__(self) -> None:
        self.doc, self.offset, self.length, self.n_imgs = array("q"), array("q"), array("q"), array("q")
        self.pids, self.cats = _Column(), _Column()

    def add(self, raw: RawDocument, f: DocFields) -> None:
        self.doc.append(raw.doc)
        self.offset.append(raw.offset)
        self.length.append(len(raw.data))
        self.n_imgs.append(len(f.pictures))
        self.pids.append(f.product_id)
        self.cats.append(f.category_id)

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({c: np.asarray(getattr(self, c), dtype=np.int64) for c in ("doc", "offset", "length")})
        frame["product_id"] = self.pids.strings()
        frame["category_id"] = self.cats.strings()
        frame["n_imgs"] = np.asarray(self.n_imgs, dtype=np.int32)
        frame["split"] = product_splits(frame["product_id"])
        return frame[INDEX_COLUMNS]


def scan(path: str | Path, progress: Callable[[int, int], None] | None = None) -> BsonIndex:
    """Read the whole dump once and index it (no cache involved).

    ``progress(bytes_done, bytes_total)`` is called after each document when given.
    """
    problems: list[dict] = []
    rows = _IndexBuilder()
    total, seen, decode = os.path.getsize(path), 0, fast_decoder()
    for raw in iter_raw(path, problems):
        seen += 1
        try:
            rows.add(raw, read_document(raw.data, decode))
        except CorruptDocument as e:
            problems.append(problem(raw.offset, f"document {raw.doc} at offset {raw.offset}: {e}"))
        if progress is not None:
            progress(raw.offset + len(raw.data), total)
    return BsonIndex(rows.frame(), problems, seen)


def _read_cached(sidecar: Path, stamp: dict) -> BsonIndex | None:
    """The cached index at ``sidecar`` if it was made from this very dump, else ``None``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(sidecar)
        meta = json.loads((table.schema.metadata or {}).get(b"catalens", b"{}"))
    except (OSError, ValueError):  # absent, unreadable or not parquet
        return None
    if meta.get("stamp") != stamp or list(table.column_names) != INDEX_COLUMNS:
        return None
    frame = table.to_pandas()
    frame["category_id"] = frame["category_id"].astype(object).where(frame["category_id"].notna(), None)
    return BsonIndex(frame, meta["problems"], meta["documents_seen"], str(sidecar), from_cache=True)


def _write_atomic(sidecar: Path, index: BsonIndex, stamp: dict) -> None:
    """Write the index to ``sidecar`` via a temporary file and a rename (readers never see half)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(index.frame, preserve_index=False)
    meta = {"stamp": stamp, "problems": index.problems, "documents_seen": index.documents_seen}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"catalens": json.dumps(meta)})
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    tmp = sidecar.with_name(f"{sidecar.name}.tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, sidecar)
    finally:
        tmp.unlink(missing_ok=True)


def build_index(path: str | Path, use_cache: bool = True,
                progress: Callable[[int, int], None] | None = None) -> BsonIndex:
    """The index of a dump: from its sidecar when the dump's size and mtime match, else scanned.

    A fresh scan is written to ``<dump>.index.parquet`` (or, when the dump's folder is
    read-only, to ``$CATALENS_CACHE/bson-index/``), atomically.
    """
    path = Path(path)
    stamp = _stamp(path)
    candidates = sidecar_paths(path)
    if use_cache:
        for sidecar in candidates:
            cached = _read_cached(sidecar, stamp)
            if cached is not None:
                return cached
    index = scan(path, progress)
    if _stamp(path) != stamp:  # changed while scanning: do not cache a mix
        return index
    for sidecar in candidates:
        try:
            _write_atomic(sidecar, index, stamp)
            index.sidecar = str(sidecar)
            break
        except OSError:
            continue
    return index


# ----------------------------------------------------------------------------- random access


def make_ref(path: str, offset: int, k: int) -> str:
    """The catalogue path of picture ``k`` of the document at ``offset`` of dump ``path``."""
    return f"{path}{REF_SEP}{offset}:{k}"


def parse_ref(ref: str) -> tuple[str, int, int]:
    """``"D::O:k"`` → ``(D, O, k)``."""
    path, sep, where = ref.rpartition(REF_SEP)
    offset, colon, k = where.partition(":")
    if not sep or not colon or not offset.isdigit() or not k.isdigit():
        raise ValueError(f"'{ref}' is not a BSON picture reference '<dump>::<offset>:<k>'")
    return path, int(offset), int(k)


def _pread(fd: int, n: int, offset: int, lock: threading.Lock | None) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    with lock:  # no pread (Windows): seek + read under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def _picture_at(fd: int, offset: int, k: int, lock: threading.Lock | None = None) -> bytes:
    """Picture ``k`` of the document at ``offset`` of the open dump ``fd``."""
    head = _pread(fd, 4, offset, lock)
    if len(head) < 4:
        raise CorruptDocument(f"no document at offset {offset} (past the end of the dump)")
    (n,) = _INT32.unpack(head)
    if n < MIN_DOC_BYTES or n > MAX_DOC_BYTES:
        raise CorruptDocument(f"no document starts at offset {offset} (length prefix {n})")
    doc = _pread(fd, n, offset, lock)
    if len(doc) < n:
        raise CorruptDocument(f"document at offset {offset} claims {n} bytes, only {len(doc)} remain")
    for t, name, v, vend in _elements(doc, 0, n):
        if name == b"imgs":
            items = list(_elements(doc, *_subdocument(doc, t, v, vend, "imgs")))
            if not 0 <= k < len(items):
                raise CorruptDocument(f"document at offset {offset} has {len(items)} pictures, not {k + 1}")
            t2, _, iv, iend = items[k]
            a, b = _picture_span(doc, k, *_subdocument(doc, t2, iv, iend, f"imgs[{k}]"))
            return doc[a:b]
    raise CorruptDocument(f"document at offset {offset} has no 'imgs' array")


def read_picture(path: str | Path, offset: int, k: int) -> bytes:
    """The bytes of picture ``k`` (``imgs[k].picture``) of the document at byte ``offset``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        return _picture_at(fd, offset, k, threading.Lock())
    finally:
        os.close(fd)


class BsonReader:
    """Catalogue reader for ``"D::O:k"`` references: ``reader(ref) -> bytes``.

    Keeps one open descriptor per dump and per process; it is picklable (descriptors are
    dropped and reopened on first use) and notices a fork (reopens in the child). Reads use
    ``pread``, so threads can share one instance.
    """

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __call__(self, ref: str) -> bytes:
        path, offset, k = parse_ref(ref)
        try:
            return _picture_at(self._fd(path), offset, k, self._lock)
        except CorruptDocument as e:
            from catalens.ingest.images import ImageProblem

            raise ImageProblem("undecodable", f"{e} in '{path}' (did the dump change since it was "
                                              f"indexed? delete '{path}{INDEX_SUFFIX}')") from None

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():  # forked: do not share the parent's descriptors
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def close(self) -> None:
        """Close the descriptors this process opened."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        return "BsonReader()"


# ----------------------------------------------------------------------------- labels and splits


def find_category_table(dump: Path) -> Path | None:
    """``<stem>_categories.csv`` or ``category_names.csv`` next to the dump, if present."""
    for name in (f"{dump.stem}_categories.csv", "category_names.csv"):
        p = dump.with_name(name)
        if p.is_file():
            return p
    return None


def read_category_table(path: Path) -> pd.DataFrame:
    """``category_id`` → ``level1, level2, level3`` (Cdiscount's ``category_level1..3`` accepted)."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    df.columns = [c.strip() for c in df.columns]
    df = df.rename(columns={f"category_{lv}": lv for lv in LEVEL_TASKS})
    missing = [c for c in ("category_id", *LEVEL_TASKS) if c not in df]
    if missing:
        raise ValueError(f"category table '{path}' lacks column(s) {missing}; expected category_id, "
                         f"level1, level2, level3 (or category_level1..3); columns are {list(df.columns)}")
    df["category_id"] = df["category_id"].str.strip()
    dup = df["category_id"].duplicated()
    if dup.any():
        raise ValueError(f"category table '{path}' repeats category_id '{df['category_id'][dup].iloc[0]}' "
                         f"(line {int(np.argmax(dup.to_numpy())) + 2}); each id must appear once")
    empty = df[list(LEVEL_TASKS)].isna().any(axis=1)
    if empty.any():
        raise ValueError(f"category table '{path}' line {int(np.argmax(empty.to_numpy())) + 2} has an empty "
                         f"level name; every category needs level1, level2 and level3")
    return _unique_leaves(df.set_index("category_id")[list(LEVEL_TASKS)])


def _unique_leaves(levels: pd.DataFrame) -> pd.DataFrame:
    """Make each level name denote one parent: a name used under two parents gets its parent appended."""
    levels = levels.copy()
    for parent, child in zip(LEVEL_TASKS, LEVEL_TASKS[1:]):
        parents = levels.groupby(child)[parent].nunique()
        shared = levels[child].isin(parents[parents > 1].index)
        levels.loc[shared, child] = levels.loc[shared, child] + " (" + levels.loc[shared, parent] + ")"
    return levels


def product_splits(product_ids: pd.Series) -> np.ndarray:
    """train/val/test (80/10/10) from a hash of each product id: stable across runs and machines."""
    pct = np.fromiter((int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") % 100
                       for p in product_ids), dtype=np.int64, count=len(product_ids))
    out = np.empty(len(pct), dtype=object)
    lo = 0
    for name, hi in SPLIT_CUTS:
        out[(pct >= lo) & (pct < hi)] = name
        lo = hi
    return out


# ----------------------------------------------------------------------------- source


def _picture_frame(index: pd.DataFrame, dump: str) -> pd.DataFrame:
    """Explode the document index to one row per picture (id, product_id, path, split, text, row).

    Vectorised string operations: about 2 s per million documents.
    """
    n = index["n_imgs"].to_numpy()
    rep = np.repeat(np.arange(len(index)), n)
    k = pd.Series(np.arange(len(rep)) - np.repeat(np.cumsum(n) - n, n)).astype("str")
    pids = index["product_id"].astype("str").take(rep).reset_index(drop=True)
    docs = dump + REF_SEP + index["offset"].astype("str")
    return pd.DataFrame({
        "id": pids + "-" + k,
        "product_id": pids,
        "path": docs.take(rep).reset_index(drop=True) + ":" + k,
        "split": index["split"].take(rep).reset_index(drop=True),
        "text": None,
        "row": index["doc"].to_numpy()[rep],
    })


TaskSpecs = list[tuple[str, str | None]]  # (task name, parent)


def _label_columns(cats: np.ndarray, table: Path | None) -> tuple[dict[str, np.ndarray], TaskSpecs, dict]:
    """Label columns, task specs (name, parent) and notes for meta, from category ids."""
    if table is None:
        return {CATEGORY_TASK: cats}, [(CATEGORY_TASK, None)], {}
    levels = read_category_table(table)
    known = pd.Series(cats).isin(levels.index).to_numpy()
    unknown = sorted({c for c, ok in zip(cats, known) if c is not None and not ok})
    joined = levels.reindex(pd.Series(cats).fillna("<none>"))
    cols = {lv: np.where(known, joined[lv].to_numpy(dtype=object), None) for lv in LEVEL_TASKS}
    specs = [(lv, parent) for lv, parent in zip(LEVEL_TASKS, (None, *LEVEL_TASKS[:-1]))]
    notes = {"category_table": str(table)}
    if unknown:
        notes["categories_not_in_table"] = {"count": len(unknown), "examples": unknown[:10]}
    return cols, specs, notes


def _tasks(frame: pd.DataFrame, specs: TaskSpecs) -> list[TaskInfo]:
    return [TaskInfo(name=name, kind="class", classes=sorted(str(v) for v in pd.unique(frame[name].dropna())),
                     parent=parent) for name, parent in specs]


def _warn_problems(path: Path, problems: list[dict]) -> None:
    if problems:
        first = problems[0]["problem"]
        warnings.warn(f"BSON dump '{path}': {len(problems)} problem(s), corrupt documents skipped; "
                      f"first: {first}. All are in catalogue.meta['problems'].", stacklevel=3)


def _source_problem(dump: str, p: dict) -> dict:
    """A skipped document as a problems.csv line (row: the byte offset, as no row number exists)."""
    return {"row": p["offset"], "id": "", "path": f"{dump}{REF_SEP}{p['offset']}", "problem": "corrupt_document",
            "detail": p["problem"], "fix": PROBLEM_FIXES["corrupt_document"]}


@SOURCES.register("bson")
class BsonSource:
    """A MongoDB BSON dump of products ``{_id, category_id, imgs: [{picture}]}`` (Cdiscount).

    One catalogue row per picture; labels from ``category_id`` (task ``category``) or, with
    a category table next to the dump, the hierarchy ``level1 > level2 > level3``.
    """

    name = "bson"

    def detect(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".bson"

    def load(self, path: Path) -> Catalogue:
        index = build_index(path)
        dump = str(path.resolve())
        frame = _picture_frame(index.frame, dump)
        cats = np.repeat(index.frame["category_id"].to_numpy(dtype=object), index.frame["n_imgs"].to_numpy())
        cols, specs, notes = _label_columns(cats, find_category_table(path))
        for name, values in cols.items():
            frame[name] = pd.Series(values, index=frame.index, dtype=object)  # None stays None
        if index.problems and not len(index.frame):
            raise ValueError(f"BSON dump '{path}' holds no usable document: {len(index.problems)} problem(s), "
                             f"first: {index.problems[0]['problem']}. Is it a MongoDB dump of products "
                             f"{{_id, category_id, imgs: [{{picture}}]}}? See docs/bson.md")
        unlabelled = frame[list(cols)].isna().all(axis=1).to_numpy()
        # nothing to train or score on: not part of any split (None, like every source's missing split)
        frame["split"] = pd.Series(np.where(unlabelled, None, frame["split"].to_numpy(dtype=object)),
                                   index=frame.index, dtype=object)
        _warn_problems(path, index.problems)
        meta = {"name": path.stem, "dump": dump, "documents": len(index.frame),
                "documents_seen": index.documents_seen, "documents_skipped": index.documents_seen - len(index.frame),
                "problems": index.problems, "splits_from": SPLIT_RULE,
                "source_problems": [_source_problem(dump, p) for p in index.problems],
                "split_rule": "blake2b(product_id) % 100: <80 train, <90 val, else test",
                "index": index.sidecar, "index_from_cache": index.from_cache, **notes}
        return Catalogue(frame=frame, tasks=_tasks(frame, specs), root=path.parent, source=self.name,
                         reader=BsonReader(), meta=meta)

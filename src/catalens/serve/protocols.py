"""Request parsing and response shapes of the three HTTP protocols the server speaks.

- catalens ``POST /v1/predict``: multipart (one or several files) or a raw image body →
  per image: top-k labels per class task, tags with probabilities and decisions, hierarchy
  path, timings.
- TF-Serving REST ``POST /v1/models/{name}:predict``: ``{"instances": [{"b64": ...}]}`` (row
  format) or ``{"inputs": ...}`` (columnar) → ``{"predictions": [...]}`` / ``{"outputs": ...}``.
- KServe / Open Inference Protocol v2 ``POST /v2/models/{name}/infer``: one ``BYTES`` input,
  elements base64 strings in JSON, or raw bytes with the binary tensor extension
  (``Inference-Header-Content-Length``) → FP32 outputs, one per task.

Everything that can go wrong with a request raises :class:`ApiError` (an HTTP status, a short
code and a message saying what was wrong); nothing here fetches URLs. The JSON bodies of the
TF-Serving and KServe routes are validated with the pydantic models of :mod:`catalens.serve.schemas`
(which also give ``/docs`` its schemas); JSON nested deeper than the parser's limit (200 levels)
is refused with 400 ``bad_json``.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from catalens.tasks import TaskInfo

IMAGE_FIELD_NAMES = {"file", "files", "image", "images", "photo", "photos", "file[]", "files[]"}
TITLE_FIELD_NAMES = {"title", "titles", "title[]", "titles[]"}
MAX_TITLE_CHARS = 2000  # longer titles are cut (characters, whatever the protocol)
RAW_TYPES = ("image/", "application/octet-stream")
KSERVE_BINARY_HEADER = "inference-header-content-length"
KSERVE_TITLE_INPUTS = ("title", "titles")


class ApiError(Exception):
    """A request the server refuses: answered as ``{"error": {"code", "message", ...}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **extra) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


@dataclass
class Upload:
    """One image of a request: its bytes and a name to report it by."""

    data: bytes
    name: str
    content_type: str | None = None


# ----------------------------------------------------------------------------- body reading

async def read_limited(receive_stream, limit: int, declared: str | None, expect_continue: bool = False) -> bytes:
    """Read a request body, refusing (413) once it exceeds ``limit`` bytes: never buffers more.

    A declared Content-Length over the limit is refused before anything is kept. So that an
    ordinary client (which sends its whole body before reading the answer) gets the 413 rather
    than a connection reset, a too-large body of up to :func:`drain_cap` bytes is read to its end
    and thrown away; beyond that (or when the client waits for ``100-continue``) the server answers
    at once and closes the connection.
    """
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"Content-Length '{declared}' is not a number") from None
        if n > limit:
            if not expect_continue and n <= drain_cap(limit):
                async for _ in receive_stream:
                    pass
            raise too_large(n, limit)
    chunks, total = [], 0
    async for chunk in receive_stream:
        total += len(chunk)
        if total > limit:
            chunks.clear()
            async for more in receive_stream:  # discard, bounded
                total += len(more)
                if total > drain_cap(limit):
                    break
            raise too_large(total, limit, streamed=True)
        chunks.append(chunk)
    return b"".join(chunks)


def drain_cap(limit: int) -> int:
    """How much of a too-large body is read (and discarded) before answering 413."""
    return 4 * limit + 8 * 2**20


def too_large(n: int, limit: int, streamed: bool = False) -> ApiError:
    what = f"more than {limit:,} bytes arrived" if streamed else f"the body is {n:,} bytes"
    return ApiError(413, "too_large", f"request too large: {what}, the limit is {limit / 2**20:g} MiB "
                                      f"(server option --max-upload-mb); send fewer or smaller photos",
                    limit_bytes=limit)


# ----------------------------------------------------------------------------- catalens /v1/predict

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def parse_predict_body(body: bytes, content_type: str | None, max_images: int) -> tuple[list[Upload], dict]:
    """The images of a ``/v1/predict`` request (multipart files or one raw image body), and the
    plain form fields (e.g. ``top_k``) of a multipart body."""
    mt = media_type(content_type)
    fields: dict[str, str] = {}
    if mt == "multipart/form-data":
        uploads, fields = parse_multipart(body, content_type, max_images)
    elif mt.startswith(RAW_TYPES) or (not mt and body):
        if not body:
            raise ApiError(400, "empty_body", "the request body is empty: send the photo's bytes")
        uploads = [Upload(body, "body", mt or None)]
    elif not mt and not body:
        raise ApiError(400, "empty_body", "the request body is empty: send a photo as multipart/form-data "
                                          "(curl -F file=@photo.jpg) or as the raw body "
                                          "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg')")
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type '{mt}' is not accepted here: send photos as multipart/form-data "
                       f"(curl -F file=@photo.jpg) or one photo as the raw body with Content-Type image/* or "
                       f"application/octet-stream; JSON with base64 goes to /v1/models/NAME:predict "
                       f"(TF-Serving) or /v2/models/NAME/infer (KServe v2)")
    if not uploads:
        raise ApiError(400, "no_images", "the multipart form holds no file: add one or more file fields "
                                         "(e.g. curl -F file=@photo.jpg)")
    if len(uploads) > max_images:
        raise ApiError(413, "too_many_images", f"{len(uploads)} images in one request; the limit is {max_images} "
                                               f"(server option --max-images)")
    return uploads, fields


def parse_multipart(body: bytes, content_type: str, max_images: int) -> tuple[list[Upload], dict]:
    """Files and plain fields of a multipart body already read into memory (bounded by the upload limit);
    ``title`` fields (one per file, in the files' order) are collected in ``fields["titles"]``."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary in the Content-Type header")
    parts: list[dict] = []
    cur: dict = {}
    hname, hval = bytearray(), bytearray()

    def on_part_begin():
        cur.clear()
        cur.update(headers={}, data=bytearray())

    def on_header_end():
        cur["headers"][bytes(hname).decode("latin-1").lower()] = bytes(hval).decode("utf-8", "replace")
        hname.clear()
        hval.clear()

    def on_part_end():
        parts.append(dict(cur))
        if len(parts) > max_images + 16:
            raise ApiError(413, "too_many_images", f"more than {max_images} parts in one request "
                                                   f"(server option --max-images)")

    callbacks = {"on_part_begin": on_part_begin, "on_header_end": on_header_end, "on_part_end": on_part_end,
                 "on_header_field": lambda d, s, e: hname.extend(d[s:e]),
                 "on_header_value": lambda d, s, e: hval.extend(d[s:e]),
                 "on_part_data": lambda d, s, e: cur["data"].extend(d[s:e])}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, "bad_multipart", f"the multipart body cannot be parsed ({type(e).__name__}: {e})") from None
    if body and not parts:
        raise ApiError(400, "bad_multipart", "the multipart body holds no part (wrong boundary?)")
    uploads, fields = [], {}
    for i, p in enumerate(parts):
        _, dparams = parse_options_header(p["headers"].get("content-disposition", ""))
        name = dparams.get(b"name", b"").decode("utf-8", "replace")
        filename = dparams.get(b"filename")
        if filename is None and name.lower() in TITLE_FIELD_NAMES:  # one product title per file, in order
            # UTF-8 needs at most 4 bytes a character: decode a bounded prefix, then cut characters
            text = bytes(p["data"][:4 * MAX_TITLE_CHARS]).decode("utf-8", "replace")[:MAX_TITLE_CHARS]
            fields.setdefault("titles", []).append(text)
            continue
        if filename is None and name.lower() not in IMAGE_FIELD_NAMES:
            fields[name] = bytes(p["data"][:256]).decode("utf-8", "replace")  # a plain field, e.g. top_k
            continue
        label = filename.decode("utf-8", "replace") if filename else (name or f"part{i}")
        uploads.append(Upload(bytes(p["data"]), label, p["headers"].get("content-type")))
    return uploads, fields


def check_titles(titles, n: int, where: str = "title fields") -> list[str | None] | None:
    """One product title (or None / empty) per image, or None when the request sent none."""
    if titles is None:
        return None
    if not isinstance(titles, list) or not all(t is None or isinstance(t, str) for t in titles):
        raise ApiError(400, "bad_titles", f"{where}: expected a list of strings (product titles), got "
                                          f"{str(titles)[:80]}")
    if len(titles) != n:
        raise ApiError(400, "bad_titles", f"{len(titles)} {where} for {n} images: send one title per image, in "
                                          f"the images' order (an empty title for an image without one)")
    return [t[:MAX_TITLE_CHARS] if t else None for t in titles]


def parse_top_k(value, default: int, n_max: int = 1000) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_parameter", f"top_k must be a whole number, got '{str(value)[:40]}'") from None
    if not 1 <= k <= n_max:
        raise ApiError(400, "bad_parameter", f"top_k must be between 1 and {n_max}, got {k}")
    return k


# ----------------------------------------------------------------------------- JSON + base64

def parse_json(body: bytes):
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send a JSON document")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, "bad_json", f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "the JSON is nested too deeply to be a request of this server") from None


def validate_json(model, body: bytes, what: str) -> dict:
    """Parse and validate a JSON body with a pydantic model: the fields that were sent, as a dict.

    Malformed or too deeply nested JSON → 400 ``bad_json``; a wrong shape → 400 ``bad_request``
    naming each wrong field (never a 500, never the body echoed back)."""
    from pydantic import ValidationError

    if not body:
        raise ApiError(400, "empty_body", "the request body is empty: send a JSON document")
    try:
        return model.model_validate_json(body).model_dump(exclude_unset=True)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        bad = next((x for x in errors if x["type"] == "json_invalid"), None)
        if bad is not None:
            detail = bad["msg"].removeprefix("Invalid JSON: ")
            if "recursion limit" in detail:
                raise ApiError(400, "bad_json", f"the JSON is nested too deeply ({detail}); {what} needs at most "
                                                f"a few levels") from None
            raise ApiError(400, "bad_json", f"the body is not valid JSON ({detail})") from None
        parts = [f"{'.'.join(map(str, x['loc'])) or 'body'}: {x['msg']}" for x in errors[:5]]
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ApiError(400, "bad_request", f"{what}: " + "; ".join(parts) + more) from None


def b64decode(s, where: str) -> bytes:
    if not isinstance(s, str):
        raise ApiError(400, "bad_request", f"{where}: expected a base64 string, got {type(s).__name__}")
    if s.startswith(("http://", "https://", "ftp://", "file:", "gs://", "s3://")):
        raise ApiError(400, "url_not_supported", f"{where}: the server never fetches URLs; send the image "
                                                 f"bytes base64-encoded")
    if s.startswith("data:") and "," in s[:200]:
        s = s.split(",", 1)[1]  # a data: URL carries the bytes itself
    try:
        t = s.replace("-", "+").replace("_", "/")  # accept url-safe base64 too
        return base64.b64decode(t + "=" * (-len(t) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_base64", f"{where}: not valid base64 ({e})") from None


# ----------------------------------------------------------------------------- TF-Serving

def _tf_instance(inst, where: str) -> bytes:
    if isinstance(inst, dict):
        if "b64" in inst:
            return b64decode(inst["b64"], where)
        inst = {k: v for k, v in inst.items() if k != "title"}
        if len(inst) == 1:  # {"image_bytes": {"b64": ...}}
            (key, val), = inst.items()
            if isinstance(val, dict) and "b64" in val:
                return b64decode(val["b64"], f"{where}.{key}")
            if isinstance(val, list) and len(val) == 1 and isinstance(val[0], dict) and "b64" in val[0]:
                return b64decode(val[0]["b64"], f"{where}.{key}")
    if isinstance(inst, str):
        b64decode(inst, where) if inst.startswith(("http://", "https://")) else None
        raise ApiError(400, "bad_request", f"{where}: a bare string is ambiguous; send the image as "
                                           f"{{\"b64\": \"<base64 bytes>\"}}")
    raise ApiError(400, "bad_request", f"{where}: expected {{\"b64\": \"<base64 image bytes>\"}} "
                                       f"(or {{\"<input>\": {{\"b64\": ...}}}}), got {str(inst)[:80]}")


def parse_tf_request(doc, max_images: int) -> tuple[list[bytes], str, list[str | None] | None]:
    """Image bytes of a TF-Serving predict request, its format (``row`` or ``columnar``) and its
    titles (:func:`tf_titles`, None when none were sent).

    ``doc``: the request body as bytes (validated with :class:`TFPredictRequest`) or already parsed."""
    if isinstance(doc, (bytes, bytearray)):
        from catalens.serve.schemas import TFPredictRequest

        doc = validate_json(TFPredictRequest, bytes(doc), "the TF-Serving predict request")
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_request", "expected a JSON object with 'instances' (or 'inputs')")
    if "instances" in doc:
        items, fmt, where = doc["instances"], "row", "instances"
    elif "inputs" in doc:
        items, fmt, where = doc["inputs"], "columnar", "inputs"
        if isinstance(items, dict):
            images = {k: v for k, v in items.items() if k != "title"}
            if len(images) != 1:
                raise ApiError(400, "bad_request", f"'inputs' must name exactly one input (the images) and "
                                                   f"optionally 'title', got {sorted(items)}")
            (key, items), = images.items()
            where = f"inputs.{key}"
    else:
        raise ApiError(400, "bad_request", f"expected 'instances' (row format) or 'inputs' (columnar format); "
                                           f"got keys {sorted(doc)[:10]}")
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "no_images", f"'{where}' must be a non-empty list of {{\"b64\": ...}}")
    if len(items) > max_images:
        raise ApiError(413, "too_many_images", f"{len(items)} instances in one request; the limit is {max_images}")
    images = [_tf_instance(x, f"{where}[{i}]") for i, x in enumerate(items)]
    return images, fmt, tf_titles(doc, len(images))


def flag_outputs(decoder) -> list[tuple[str, str]]:
    """``(name, v2 datatype)`` of the decision outputs the model gives, after the task outputs:
    ``<task>_accept`` (a model with accept thresholds), ``unknown_score`` / ``unknown`` (a model
    with an unknown threshold), ``<task>_conflict``, ``conflict`` and ``conflict_winner`` (a model
    with a title model). The values are the decoder's, as ``catalens predict`` writes them."""
    out = [(f"{t.name}_accept", "BOOL") for t in decoder.tasks if t.kind == "class" and t.name in decoder.accept]
    if decoder.unknown is not None:
        out += [("unknown_score", "FP32"), ("unknown", "BOOL")]
    if decoder.text is not None:
        out += [(f"{t.name}_conflict", "BOOL") for t in decoder.tasks if t.kind == "class"]
        out += [("conflict", "BOOL"), ("conflict_winner", "BYTES")]
    return out


def flag_values(decoder, ans) -> dict[str, list]:
    """Per :func:`flag_outputs` name, the ``n`` values (``conflict_winner``: "" without a conflict)."""
    cols = decoder.columns(ans)
    out = {name: cols[name] for name, _ in flag_outputs(decoder)}
    if "conflict_winner" in out:
        out["conflict_winner"] = [w or "" for w in out["conflict_winner"]]
    return out


def tf_titles(doc: dict, n: int) -> list[str | None] | None:
    """Product titles of a TF-Serving request: a ``title`` key next to ``b64`` in each instance
    (row format) or a ``title`` input next to the images (columnar); None when none was sent."""
    if isinstance(doc.get("instances"), list):
        items = doc["instances"]
        if not any(isinstance(x, dict) and "title" in x for x in items):
            return None
        return check_titles([x.get("title") if isinstance(x, dict) else None for x in items], n,
                            "titles in instances[].title")
    inputs = doc.get("inputs")
    if isinstance(inputs, dict) and "title" in inputs:
        return check_titles(inputs["title"], n, "titles in inputs.title")
    return None


def tf_response(decoder, ans, fmt: str) -> dict:
    """TF-Serving's shapes: per task its probabilities, per class task ``<task>_label``, the
    label the decoder decided (hierarchy decoding included), as ``catalens predict`` writes it,
    and the decision outputs of :func:`flag_outputs`."""
    labels = decoder.labels(ans)
    flags = flag_values(decoder, ans)
    n = len(ans)
    rows = []
    for i in range(n):
        row = {}
        for t in decoder.tasks:
            row[t.name] = [float(v) for v in ans.probs[t.name][i]]
            if t.kind == "class":
                row[f"{t.name}_label"] = labels[t.name][i]
        row.update({k: v[i] for k, v in flags.items()})
        rows.append(row)
    if fmt == "row":
        return {"predictions": rows}
    return {"outputs": {k: [r[k] for r in rows] for k in rows[0]} if rows else {}}


# ----------------------------------------------------------------------------- KServe v2

def _split_bytes_tensor(blob: bytes, n: int, where: str) -> list[bytes]:
    """BYTES tensor in the binary extension: each element is a 4-byte little-endian length + bytes."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ApiError(400, "bad_request", f"{where}: binary BYTES data ends inside a length prefix")
        (k,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + k > len(blob):
            raise ApiError(400, "bad_request", f"{where}: element {len(out)} claims {k} bytes, "
                                               f"only {len(blob) - pos} remain")
        out.append(blob[pos:pos + k])
        pos += k
    if len(out) != n:
        raise ApiError(400, "bad_request", f"{where}: shape says {n} elements, binary data holds {len(out)}")
    return out


def parse_kserve_request(body: bytes, headers, max_images: int) -> tuple[list[bytes], dict]:
    """Image bytes of a v2 infer request (JSON, or JSON + binary tensor data) and the JSON header."""
    from catalens.serve.schemas import KServeInferRequest

    header_len = headers.get(KSERVE_BINARY_HEADER)
    binary = b""
    if header_len is not None:
        try:
            hl = int(header_len)
        except ValueError:
            raise ApiError(400, "bad_request", f"Inference-Header-Content-Length '{header_len}' is not a number") from None
        if not 0 < hl <= len(body):
            raise ApiError(400, "bad_request", f"Inference-Header-Content-Length {hl} does not fit the "
                                               f"{len(body)}-byte body")
        doc, binary = validate_json(KServeInferRequest, body[:hl], "the v2 infer request"), body[hl:]
    else:
        doc = validate_json(KServeInferRequest, body, "the v2 infer request")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise ApiError(400, "bad_request", "expected {\"inputs\": [{\"name\": ..., \"shape\": [n], "
                                           "\"datatype\": \"BYTES\", \"data\": [<base64>, ...]}]}")
    inputs = [i for i in doc["inputs"] if not (isinstance(i, dict) and i.get("name") in KSERVE_TITLE_INPUTS)]
    if len(inputs) != 1 or len(doc["inputs"]) > 2:
        raise ApiError(400, "bad_request", f"this model takes the images as one BYTES input and optionally the "
                                           f"product titles as a BYTES input named 'title'; got "
                                           f"{len(doc['inputs'])} inputs")
    inp = inputs[0]
    if not isinstance(inp, dict):
        raise ApiError(400, "bad_request", "inputs[0] must be an object")
    name = inp.get("name", "image")
    if inp.get("datatype") != "BYTES":
        raise ApiError(400, "bad_request", f"input '{name}': datatype must be BYTES (encoded image files), "
                                           f"got {inp.get('datatype')!r}")
    shape = inp.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise ApiError(400, "bad_request", f"input '{name}': shape must be a list of sizes like [n], got {shape!r}")
    n = math.prod(shape)  # exact: numpy's product wraps around for sizes like [2**62, 4]
    if n == 0:
        raise ApiError(400, "no_images", f"input '{name}': shape {shape} holds no image")
    if n > max_images:
        raise ApiError(413, "too_many_images", f"{n} images in one request; the limit is {max_images}")
    params = inp.get("parameters") or {}
    if "binary_data_size" in params or ("data" not in inp and binary):
        size = params.get("binary_data_size", len(binary))
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise ApiError(400, "bad_request", f"input '{name}': binary_data_size {size!r} but only "
                                               f"{len(binary)} binary bytes follow the JSON header")
        blob = binary[:size]
        try:
            images = _split_bytes_tensor(blob, n, f"input '{name}'")
        except ApiError:
            if n != 1:
                raise
            images = [blob]  # one raw image without a length prefix
        return images, doc
    data = inp.get("data")
    if not isinstance(data, list):
        raise ApiError(400, "bad_request", f"input '{name}': 'data' must be a list of base64 strings")
    flat = list(_flatten(data))
    if len(flat) != n:
        raise ApiError(400, "bad_request", f"input '{name}': shape {shape} means {n} elements, data holds {len(flat)}")
    return [b64decode(x, f"input '{name}' element {i}") for i, x in enumerate(flat)], doc


def kserve_titles(doc: dict, n: int) -> list[str | None] | None:
    """The optional ``title`` input of a v2 request: UTF-8 strings in JSON ``data``, one per image."""
    inp = next((i for i in doc.get("inputs", []) if isinstance(i, dict) and i.get("name") in KSERVE_TITLE_INPUTS),
               None)
    if inp is None:
        return None
    if inp.get("datatype") != "BYTES" or not isinstance(inp.get("data"), list):
        raise ApiError(400, "bad_titles", f"input '{inp.get('name')}': send the titles as datatype BYTES with "
                                          f"'data': a list of strings, one per image")
    return check_titles(list(_flatten(inp["data"])), n, f"titles in input '{inp.get('name')}'")


def _flatten(x):
    for v in x:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def kserve_output_names(decoder) -> list[str]:
    """Per task its probabilities (FP32), per class task ``<task>_label`` (BYTES), then the
    decision outputs of :func:`flag_outputs`."""
    tasks = decoder.tasks
    names = [n for t in tasks for n in ([t.name, f"{t.name}_label"] if t.kind == "class" else [t.name])]
    return names + [n for n, _ in flag_outputs(decoder)]


def kserve_response(name: str, decoder, ans, doc: dict) -> dict:
    """v2 outputs: each task's probabilities ``[n, C]``, each class task's decided label ``[n]``
    (the decoder's, hierarchy decoding included), and the decisions of :func:`flag_outputs`
    (``[n]`` each: BOOL, FP32 or BYTES)."""
    wanted = [o.get("name") for o in doc.get("outputs") or [] if isinstance(o, dict)]
    names = kserve_output_names(decoder)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ApiError(400, "bad_request", f"unknown output(s) {unknown}; outputs are {names}")
    labels = decoder.labels(ans)
    outputs = []
    for t in decoder.tasks:
        if not wanted or t.name in wanted:
            arr = np.asarray(ans.probs[t.name], dtype=np.float32)
            outputs.append({"name": t.name, "datatype": "FP32", "shape": list(arr.shape),
                            "data": [float(v) for v in arr.ravel()]})
        if t.kind == "class" and (not wanted or f"{t.name}_label" in wanted):
            outputs.append({"name": f"{t.name}_label", "datatype": "BYTES", "shape": [len(ans)],
                            "data": labels[t.name]})
    values = flag_values(decoder, ans)
    for fname, dtype in flag_outputs(decoder):
        if not wanted or fname in wanted:
            outputs.append({"name": fname, "datatype": dtype, "shape": [len(ans)], "data": values[fname]})
    out = {"model_name": name, "model_version": "1", "outputs": outputs}
    if "id" in doc:
        out["id"] = doc["id"]
    return out


def kserve_metadata(name: str, tasks: list[TaskInfo], description: dict, titles: bool = False,
                    decoder=None) -> dict:
    """v2 model metadata; ``titles``: the model fuses product titles (an optional ``title`` input);
    ``decoder``: the model's decoder, whose decision outputs (:func:`flag_outputs`) are listed."""
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1],
               "parameters": {"content": "encoded image files (JPEG, PNG, WebP, ...); base64 strings "
                                         "in JSON, or raw bytes with the binary tensor extension"}}]
    if titles:
        inputs.append({"name": "title", "datatype": "BYTES", "shape": [-1], "optional": True,
                       "parameters": {"content": "product titles as UTF-8 strings, one per image (optional)"}})
    return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": inputs,
            "outputs": [o for t in tasks for o in ([{"name": t.name, "datatype": "FP32", "shape": [-1, t.n_outputs]}]
                                                   + ([{"name": f"{t.name}_label", "datatype": "BYTES", "shape": [-1]}]
                                                      if t.kind == "class" else []))]
            + [{"name": n, "datatype": d, "shape": [-1]} for n, d in (flag_outputs(decoder) if decoder else [])],
            "parameters": {"tasks": [{"name": t.name, "kind": t.kind, "classes": t.classes, "parent": t.parent,
                                      "thresholds": t.thresholds} for t in tasks],
                           "preprocess": description.get("preprocess")}}

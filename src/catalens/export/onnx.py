"""Export a model folder to one ONNX graph, check it against torch, and run it with ONNX Runtime.

The graph (``MODEL/model.onnx`` by default)::

    input   pixels              uint8  (n, 3, S, S)   RGB, NCHW, 0..255, already resized and
                                                      centre-cropped as the model's preprocess says
    outputs <task> per task     float32 (n, C_task)   probabilities in the task's class order
                                                      (softmax for class tasks, sigmoid for tags)

Normalisation (mean/std), the backbone, the heads and softmax/sigmoid are all inside the graph:
a caller only decodes, resizes and crops (:func:`catalens.ingest.images.load_rgb`) and
transposes HWC → CHW. The description a caller needs (tasks, class order, parents, tag
thresholds, preprocess, hierarchy paths) is stored twice: inside the ONNX file as the
``metadata_props`` entry ``catalens`` (so a lone ``.onnx`` file is self-describing), and in the
side file ``onnx.json`` with the parity check and, after ``--int8``, the quantisation report.
"""
from __future__ import annotations

import logging
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from catalens.files import apply_umask_mode
from catalens.ingest.images import LEGACY_JPEG, ImageProblem, Preprocess, load_rgb
from catalens.tasks import TaskInfo, hierarchy_levels

_logger = logging.getLogger(__name__)

ONNX_FORMAT = "catalens-onnx/1"
INPUT_NAME = "pixels"
DEFAULT_OPSET = 17
PARITY_TOLERANCE = 1e-4
METADATA_KEY = "catalens"


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported graph disagrees with torch."""


# ----------------------------------------------------------------------------- paths

def default_onnx_path(model_dir: str | Path, int8: bool = False) -> Path:
    return Path(model_dir) / ("model.int8.onnx" if int8 else "model.onnx")


def sidecar_path(onnx_path: str | Path) -> Path:
    """``MODEL/model.onnx`` → ``MODEL/onnx.json``; any other ``X.onnx`` → ``X.json``."""
    p = Path(onnx_path)
    if p.name == "model.onnx":
        return p.with_name("onnx.json")
    out = p.with_suffix(".json")
    return out if out.name != "model.json" else p.with_name(p.name + ".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- description

def describe(model, name: str | None = None, source_sha256: str | None = None) -> dict:
    """What a caller of the graph needs: stored in the ONNX metadata and in onnx.json."""
    pre = model.preprocess
    tasks = model.tasks
    return {
        "format": ONNX_FORMAT,
        "name": name,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW",
                  "shape": ["n", 3, *pre.hw], "range": [0, 255],
                  "colour": "RGB", "note": "decoded, EXIF-rotated, resized and centre-cropped as 'preprocess' says; "
                                           "normalisation is inside the graph"},
        "outputs": [{"name": t.name, "dtype": "float32", "shape": ["n", t.n_outputs],
                     "kind": t.kind, "meaning": "softmax probabilities" if t.kind == "class" else
                     "sigmoid probabilities (tag present if >= threshold)"} for t in tasks],
        "tasks": [t.to_dict() for t in tasks],
        "preprocess": pre.to_dict(),
        "hierarchy": hierarchy_levels(tasks),
        "hierarchy_paths": model.meta.get("hierarchy_paths", {}),
        "backbone": {k: v for k, v in model.backbone.describe().items() if k != "preprocess"},
        "source_model_sha256": source_sha256,
        "trained_on": model.meta.get("data"),
    }


def read_description(onnx_path: str | Path) -> dict:
    """The catalens description stored in an exported graph (metadata_props ``catalens``)."""
    try:
        import onnx
    except ImportError:  # onnxruntime alone can read the metadata too
        import onnxruntime as ort

        meta = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_modelmeta()
        props = meta.custom_metadata_map
    else:
        m = onnx.load(str(onnx_path), load_external_data=False)
        props = {p.key: p.value for p in m.metadata_props}
    if METADATA_KEY in props:
        return json.loads(props[METADATA_KEY])
    side = sidecar_path(onnx_path)
    if side.exists():
        return json.loads(side.read_text())["description"]
    raise ExportError(f"'{onnx_path}' carries no catalens description (metadata_props '{METADATA_KEY}'); "
                      f"export it with 'catalens export MODEL'")


# ----------------------------------------------------------------------------- images for checks

def _data_catalogue(data: str | Path | None, model=None):
    """The catalogue to draw check/calibration photos from (``data`` or the model's training data)."""
    from catalens.ingest.open import open_catalogue

    path = data if data is not None else (model.meta.get("data") if model is not None else None)
    if not path:
        return None
    try:
        return open_catalogue(path)
    except (FileNotFoundError, ValueError) as e:
        if data is not None:
            raise
        warnings.warn(f"training data '{path}' cannot be opened ({e})", stacklevel=2)
        return None


def decode_rows(cat, pre: Preprocess, splits: tuple[str, ...], limit: int | None, seed: int = 0,
                with_labels=None) -> tuple[np.ndarray, list[int], dict[str, np.ndarray] | None]:
    """Decode up to ``limit`` photos of the first of ``splits`` that has rows.

    Returns pixels ``(n, S, S, 3)`` uint8, the catalogue row of each, and (when ``with_labels``
    is a task list) the labels of those rows in that class order. Undecodable rows are skipped.
    """
    sub = None
    for s in splits:
        if s is None:
            sub = cat
            break
        if cat.has_split(s):
            sub = cat.split(s)
            break
    if sub is None or len(sub) == 0:
        return np.zeros((0, *pre.hw, 3), np.uint8), [], None
    order = np.arange(len(sub))
    if limit is not None and len(order) > limit:
        order = np.sort(np.random.default_rng(seed).choice(len(sub), size=limit, replace=False))
    arrays, rows = [], []
    for i in order:
        try:
            arrays.append(load_rgb(sub.read_bytes(int(i)), pre))
            rows.append(int(i))
        except (ImageProblem, OSError):
            continue
    pixels = np.stack(arrays) if arrays else np.zeros((0, *pre.hw, 3), np.uint8)
    labels = None
    if with_labels is not None and rows:
        enc = sub.encode(with_labels)
        labels = {k: v[rows] for k, v in enc.items()}
    return pixels, rows, labels


def image_files_pixels(paths: list[str | Path], pre: Preprocess) -> np.ndarray:
    return np.stack([load_rgb(Path(p).read_bytes(), pre) for p in paths])


def to_nchw(batch_hwc: np.ndarray) -> np.ndarray:
    """``(n, S, S, 3)`` uint8 → contiguous ``(n, 3, S, S)`` uint8 (the graph's input)."""
    return np.ascontiguousarray(np.asarray(batch_hwc, dtype=np.uint8).transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------- runtime

#: how an exported graph can run: ``auto`` takes OpenVINO where it is installed (catalens[fast])
GRAPH_BACKENDS = ("auto", "onnxruntime", "openvino")


def graph_backend(name: str) -> str:
    """``onnxruntime`` or ``openvino`` for ``name`` (``auto``: OpenVINO when importable)."""
    if name not in GRAPH_BACKENDS:
        raise ValueError(f"unknown graph backend {name!r}; choose one of {', '.join(GRAPH_BACKENDS)}")
    if name == "auto":
        from catalens.embed.ov import openvino_available

        return "openvino" if openvino_available() else "onnxruntime"
    return name


class OnnxModel:
    """An exported graph in an ONNX Runtime session, with the description it carries.

    ``threads``: intra-op threads (default: the CPUs this process may use). ``spin=False``
    stops idle worker threads from busy-waiting (better when the CPUs are shared with
    decoding threads, as in the server). ``backend``: ``onnxruntime``, ``openvino`` or ``auto``
    (OpenVINO when installed); both give the same probabilities to ~1e-6.
    """

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True,
                 backend: str = "onnxruntime") -> None:
        from catalens.runtime import available_cpus

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"ONNX graph '{self.path}' does not exist; create it with "
                                    f"'catalens export MODEL'")
        self.threads = threads or available_cpus()
        self.backend = graph_backend(backend)
        if self.backend == "openvino":
            self._run = self._openvino(self.threads)
            self.description = read_description(self.path)
        else:
            self._run, meta = self._onnxruntime(self.threads, spin)
            self.description = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else read_description(self.path)
        self.tasks = [TaskInfo.from_dict(t) for t in self.description["tasks"]]
        self.preprocess = Preprocess.from_dict(self.description["preprocess"])
        if self.preprocess.jpeg is None:  # exported before model.json recorded the JPEG decoder
            self.preprocess = replace(self.preprocess, jpeg=LEGACY_JPEG)
        self.output_names = [t.name for t in self.tasks]

    def _onnxruntime(self, threads: int, spin: bool):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        name_in = self.session.get_inputs()[0].name

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, self.session.run(names, {name_in: x})))

        return run, self.session.get_modelmeta().custom_metadata_map

    def _openvino(self, threads: int):
        """The graph compiled by OpenVINO for this CPU, fp32 (1.5x ONNX Runtime's images per CPU-second
        on Lite0, docs/engine.md); compiled blobs cached next to the runtime cache's ONNX exports."""
        import threading

        from catalens.embed.ov import _ov_config, _ov_core

        compiled = _ov_core(None).compile_model(str(self.path), "CPU", _ov_config(threads, 1))
        names = [o.get_any_name() for o in compiled.outputs]
        local = threading.local()   # one infer request per calling thread

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            req = getattr(local, "req", None) or compiled.create_infer_request()
            local.req = req
            res = req.infer({0: x})
            return {n: np.array(res[o], dtype=np.float32, copy=True) for n, o in zip(names, compiled.outputs)}

        return run

    @property
    def size(self) -> int:
        """The input's height (its side when square; :attr:`hw` for both)."""
        return self.preprocess.size

    @property
    def hw(self) -> tuple[int, int]:
        """The input's ``(height, width)``."""
        return self.preprocess.hw

    def run(self, pixels_nchw: np.ndarray) -> dict[str, np.ndarray]:
        """``(n, 3, S, S)`` uint8 → ``{task: (n, C) float32}``."""
        x = np.ascontiguousarray(pixels_nchw, dtype=np.uint8)
        if x.ndim != 4 or x.shape[1:] != (3, *self.hw):
            raise ValueError(f"expected pixels (n, 3, {self.hw[0]}, {self.hw[1]}), got {x.shape}")
        return self._run(x)

    def run_hwc(self, batch_hwc: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
        """``(n, S, S, 3)`` uint8 (as :func:`load_rgb` returns) → probabilities, in chunks."""
        parts = [self.run(to_nchw(batch_hwc[i:i + batch_size])) for i in range(0, len(batch_hwc), batch_size)]
        if not parts:
            return {t.name: np.zeros((0, t.n_outputs), np.float32) for t in self.tasks}
        return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}

    def predict_bytes(self, images: list[bytes], batch_size: int = 32) -> dict[str, np.ndarray]:
        """Encoded photos → probabilities (raises :class:`ImageProblem` on the first bad one)."""
        return self.run_hwc(np.stack([load_rgb(b, self.preprocess) for b in images]), batch_size)


# ----------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    path: Path
    sidecar: Path
    parity: dict
    seconds: float
    description: dict = field(repr=False, default_factory=dict)

    @property
    def parity_ok(self) -> bool:
        return bool(self.parity.get("ok"))


def _wrapped_module(model):
    import torch
    from torch import nn

    class Uint8PixelModel(nn.Module):
        """uint8 NCHW pixels → tuple of task probabilities (the order of ``names``)."""

        def __init__(self, inner: nn.Module, names: list[str]) -> None:
            super().__init__()
            self.inner = inner
            self.names = names

        def forward(self, x: torch.Tensor):
            out = self.inner(x.to(torch.float32))
            return tuple(out[n] for n in self.names)

    return Uint8PixelModel(model.pixel_module(), [t.name for t in model.tasks]).eval()


def _torch_export(module, size: tuple[int, int], names: list[str], path: Path, opset: int) -> None:
    import torch

    x = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
    axes = {INPUT_NAME: {0: "n"}, **{n: {0: "n"} for n in names}}
    kw = dict(input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes, opset_version=opset,
              do_constant_folding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # torch >= 2.5: the TorchScript exporter needs no onnxscript
            torch.onnx.export(module, (x,), str(path), dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo argument
            torch.onnx.export(module, (x,), str(path), **kw)


def _set_metadata(path: Path, description: dict, extra: dict | None = None) -> None:
    import onnx

    m = onnx.load(str(path))
    props = {p.key: p.value for p in m.metadata_props}
    props[METADATA_KEY] = json.dumps(description, default=str)
    props.update(extra or {})
    del m.metadata_props[:]
    for k, v in props.items():
        m.metadata_props.add(key=k, value=str(v))
    m.producer_name = "catalens"
    m.doc_string = ("catalens model: input 'pixels' uint8 (n,3,S,S) RGB 0..255 after resize+centre-crop; "
                    "one float32 output per task with probabilities in class order. Description in "
                    "metadata_props['catalens'].")
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def parity_check(model, onnx_model: OnnxModel, pixels_hwc: np.ndarray, source: str,
                 tolerance: float = PARITY_TOLERANCE) -> dict:
    """Max absolute difference of probabilities, torch eager vs ONNX Runtime, on the same pixels."""
    import torch

    from catalens.embed.runtimes import to_tensor

    module = model.pixel_module()
    with torch.inference_mode():
        ref = {k: v.numpy() for k, v in module(to_tensor(pixels_hwc)).items()}
    got = onnx_model.run_hwc(pixels_hwc)
    diffs = {t.name: float(np.abs(ref[t.name] - got[t.name]).max()) if len(pixels_hwc) else 0.0
             for t in model.tasks}
    agree = {t.name: float((ref[t.name].argmax(1) == got[t.name].argmax(1)).mean()) if len(pixels_hwc) else 1.0
             for t in model.tasks if t.kind == "class"}
    worst = max(diffs.values()) if diffs else 0.0
    return {"images": int(len(pixels_hwc)), "source": source, "max_abs_diff": worst, "per_task": diffs,
            "top1_agreement": agree, "tolerance": tolerance, "ok": bool(worst < tolerance and len(pixels_hwc) > 0)}


def export_onnx(model_dir: str | Path, out: str | Path | None = None, *, parity_images: list | None = None,
                parity_data: str | Path | None = None, parity_n: int = 16, opset: int = DEFAULT_OPSET,
                name: str | None = None, log=None) -> ExportResult:
    """Export ``MODEL`` (a model folder) to ONNX and check it against torch on decoded photos.

    Parity photos: ``parity_images`` (files) when given, else up to ``parity_n`` photos of the
    model's training data (test split first), else ``parity_data``. With none at all the check
    runs on random pixels and says so.
    """
    log = log or _logger.info
    from catalens.model.load import load_model

    t0 = time.time()
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    out = Path(out) if out is not None else default_onnx_path(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = name or model_dir.resolve().name
    desc = describe(model, name, file_sha256(model_dir / "model.json"))
    names = [t.name for t in model.tasks]
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", prefix=out.stem + ".", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _torch_export(_wrapped_module(model), model.preprocess.hw, names, tmp, opset)
        _set_metadata(tmp, desc)
        apply_umask_mode(tmp)  # mkstemp made it 0600: a server account must be able to read it
        tmp.replace(out)
    finally:
        if tmp.exists():
            tmp.unlink()
    pixels, source = _parity_pixels(model, parity_images, parity_data, parity_n)
    parity = parity_check(model, OnnxModel(out), pixels, source)
    seconds = time.time() - t0
    side = sidecar_path(out)
    info = {"format": ONNX_FORMAT, "file": out.name, "sha256": file_sha256(out), "bytes": out.stat().st_size,
            "opset": opset, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "export_seconds": round(seconds, 2), "parity": parity, "description": desc,
            "versions": _versions()}
    old = json.loads(side.read_text()) if side.exists() else {}
    if "int8" in old and old.get("description", {}).get("source_model_sha256") == desc["source_model_sha256"]:
        info["int8"] = old["int8"]
    _write_json(side, info)
    status = "OK" if parity["ok"] else "FAILED"
    log(f"exported {out} ({out.stat().st_size / 1e6:.1f} MB, opset {opset}) in {seconds:.1f}s; parity with torch "
        f"on {parity['images']} {parity['source']}: max |diff| {parity['max_abs_diff']:.2e} "
        f"(tolerance {PARITY_TOLERANCE:g}) {status}")
    return ExportResult(out, side, parity, seconds, desc)


def _parity_pixels(model, images, data, n) -> tuple[np.ndarray, str]:
    pre = model.preprocess
    if images:
        return image_files_pixels(images, pre), "given photos"
    cat = _data_catalogue(data, model)
    if cat is not None:
        pixels, rows, _ = decode_rows(cat, pre, ("test", "val", "train", None), n)
        if len(pixels):
            return pixels, f"decoded photos of {cat.source} '{data or model.meta.get('data')}'"
    warnings.warn("no photos available for the parity check: using random pixels", stacklevel=2)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, *pre.hw, 3), dtype=np.uint8), "random pixels (no photos found)"


def ensure_onnx(model_dir: str | Path, log=None) -> Path:
    """``MODEL/model.onnx``, exported first if absent or older than the model's ``model.json``."""
    log = log or _logger.info
    model_dir = Path(model_dir)
    path = default_onnx_path(model_dir)
    if path.exists():
        try:
            desc = read_description(path)
            if desc.get("source_model_sha256") == file_sha256(model_dir / "model.json"):
                return path
            log(f"{path} was exported from an older model.json: exporting again")
        except Exception as e:  # unreadable graph: export again
            log(f"{path} cannot be read ({e}): exporting again")
    else:
        log(f"no {path.name} in {model_dir}: exporting it now")
    res = export_onnx(model_dir, log=log)
    if not res.parity_ok:
        log(f"warning: ONNX parity check failed (max |diff| {res.parity['max_abs_diff']:.2e})")
    return path


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in ("torch", "onnx", "onnxruntime", "catalens"):
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)

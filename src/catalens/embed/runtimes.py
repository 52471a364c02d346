"""Inference runtimes: how a batch of uint8 pixels becomes features.

A runner is a callable ``(b, S, S, 3) uint8 ndarray -> (b, dim) float32 ndarray``; the ones
built here are :class:`Runner` objects that also carry ``name`` (the runtime that really
runs, e.g. what ``auto`` chose) and ``info``.

Registered runtimes (factories ``(module, size, **opts) -> runner``):

- ``eager``   torch fp32, channels_last.
- ``onnx``    ONNX Runtime fp32: the module is exported once (uint8 NHWC pixels in, features
  out, dynamic batch) to ``<cache>/onnx/<fingerprint>-s<S>.onnx`` and run with
  ``intra_op`` threads = torch threads and all graph optimisations. Features equal eager's
  to ~1e-5.
- ``openvino`` OpenVINO fp32 on the CPU: reads the same cached ONNX export and compiles it with
  ``INFERENCE_NUM_THREADS`` = torch threads, ``INFERENCE_PRECISION_HINT`` f32 (OpenVINO would
  otherwise run bf16 on CPUs that have it) and no core pinning (decode threads share the
  cores). Compiled blobs are cached in ``<cache>/openvino/`` so a second start skips most of
  the compilation. Features equal eager's to ~1e-5 (measured 1.15-1.4x ONNX Runtime per
  CPU-second on AMD Zen 3).
- ``openvino-int8`` the ONNX export quantised by NNCF post-training quantisation (weights and
  activations int8), calibrated on real decoded photos: :func:`quantize_openvino` writes
  ``<cache>/<fingerprint>-s<S>-int8.xml``; the runtime loads it and refuses to start without
  it (calibrating on random pixels would hide an accuracy loss). Lossy: judged by its accuracy
  on real photos (benchmarks/bench_ceiling.py), not an ``auto`` candidate.
- ``compile`` ``torch.compile`` (inductor); falls back to eager with a warning when
  compilation fails. Not an ``auto`` candidate: compiling EfficientNet-Lite0 takes ~80 s
  here and measured no faster than eager (docs/engine.md).
- ``bf16``    autocast to bfloat16. Fast only where the CPU has native bf16
  (``avx512_bf16`` / ``amx_bf16``); emulated elsewhere (~10x slower than fp32), so ``auto``
  considers it only on such CPUs. Features differ from fp32 (~1e-2).
- ``cuda``    the module on the GPU (``torch.cuda``), fp32 with cuDNN's defaults (TF32
  convolutions: features equal the CPU's to ~1e-3), channels_last; pixels travel as uint8.
- ``cuda-bf16`` the same under bf16 autocast (lossy, like ``bf16``).
- ``auto``    on a machine with a CUDA GPU: ``cuda``, without measuring (any GPU outruns
  the host's cores on these networks). Otherwise it measures the candidates that make sense on this CPU on a few batches of
  random pixels (well under 3 s once the ONNX file exists) and keeps the fastest; the
  choice is remembered in ``<cache>/onnx/auto-choices.json`` per backbone fingerprint,
  input size, CPU model, thread count, library versions and catalens's ``EXPORT_REVISION``, so later runs
  skip the measurement.

:func:`runtime_parity` checks any runtime against eager on real pixels.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import platform
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from catalens.embed.ov import _ov_config, _ov_core, openvino_available, runtime_cache_dir  # noqa: F401
from catalens.registry import Registry

RUNTIMES: Registry = Registry("runtime")

#: what ``auto`` may pick, in order of preference when measurements tie
AUTO_CANDIDATES = ("eager", "onnx", "openvino", "bf16")
#: ONNX Runtime's arena grows to the largest batch it has run (EfficientNet-Lite0: ~0.8 GB at 32,
#: ~1.5 GB at 64) for no measurable gain past 32: larger batches run in chunks of this size
ORT_MAX_BATCH = 32
#: a candidate must beat the current best by this factor to be preferred (noise margin)
AUTO_MARGIN = 1.05
#: lossy runtimes ``auto`` may pick only when their features keep this cosine similarity with
#: the fp32 features on the two synthetic probe images: a guard against a broken path
#: (overflow, emulation bugs), not a tolerance. Measured with EfficientNet-Lite0 on a CPU with
#: AMX: bf16 probes 0.968, real photos >= 0.997 with 99.7% top-1 agreement and -0.3 points of
#: accuracy (benchmarks/bench_precision.py, the real-photo accuracy check).
LOSSY_MIN_COSINE = {"bf16": 0.95, "cuda-bf16": 0.95}
#: a lossy runtime must beat the best exact one by this factor to be picked: it costs accuracy
#: (bf16: -0.3 points on clothing-small), and ``auto``'s short measurement is noisy (bf16 measured
#: 1.19x ONNX Runtime in ``auto`` but 0.73x sustained on the AMX machine of bench_precision)
LOSSY_MARGIN = 1.3
#: the precision of the features each lossy runtime computes; every other runtime computes fp32 ones
#: (within ~1e-5 of eager, ~1e-3 for cuda's TF32). The embedding cache keeps each precision apart.
LOSSY_PRECISION = {"bf16": "bf16", "cuda-bf16": "bf16", "openvino-int8": "int8"}


def runtime_precision(name: str | None) -> str:
    """``fp32``, ``bf16`` or ``int8``: the precision of the features runtime ``name`` computes."""
    return LOSSY_PRECISION.get(name or "", "fp32")


def planned_precision(runtime: str, fingerprint: str, size: int, threads: int, cache_dir=None) -> str:
    """The precision runtime ``runtime`` will compute at, known before it is built: a named runtime's own;
    ``auto``'s remembered choice for this backbone, size and thread count (:func:`remembered_choice`), else
    ``fp32`` (a first ``auto`` measures after the decode workers started; the engine then writes the
    features where the chosen runtime's precision says, :func:`catalens.embed.engine.stream_features`)."""
    if runtime != "auto":
        return runtime_precision(runtime)
    entry = remembered_choice(fingerprint, size, threads, cache_dir) or {}
    return runtime_precision(entry.get("runtime"))


class Runner:
    """A runtime bound to a module: ``runner(uint8 (b,S,S,3)) -> float32 (b,dim)``."""

    def __init__(self, name: str, fn, info: dict | None = None) -> None:
        self.name = name
        self._fn = fn
        self.info = info or {}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._fn(batch)

    def __repr__(self) -> str:
        return f"Runner({self.name!r})"


# ---------------------------------------------------------------- machine facts

def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_native_bf16(flags: set[str] | None = None) -> bool:
    """True when bf16 matmuls run in hardware (AVX512-BF16 or AMX), not emulated."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def has_vnni(flags: set[str] | None = None) -> bool:
    """True when int8 dot products have VNNI (AVX512-VNNI, AVX-VNNI or AMX). Without it (AVX2 only) u8 x s8
    products are summed in saturating 16-bit lanes, so int8 weights must leave a bit of headroom."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False





def auto_candidates(flags: set[str] | None = None) -> list[str]:
    """The runtimes ``auto`` measures on this machine."""
    out = ["eager"]
    if onnxruntime_available():
        out.append("onnx")
    if openvino_available():
        out.append("openvino")
    if has_native_bf16(flags):
        out.append("bf16")
    return out





def module_fingerprint(module: nn.Module) -> str:
    """Content hash of a module's class, parameters and buffers (persistent or not)."""
    h = hashlib.sha256(type(module).__name__.encode())
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for k in sorted(tensors):
        v = tensors[k].detach().float().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.numpy().tobytes())
    for name, m in module.named_modules():   # a pooling other than avg computes other features from the same weights
        pool = getattr(m, "pool", "avg")
        if isinstance(pool, str) and pool != "avg":
            h.update(f"{name}.pool={pool}".encode())
    return f"{type(module).__name__}-{h.hexdigest()[:16]}"


def _real(module):
    """The torch module itself (a :class:`catalens.embed.backbones.LazyModule` is built now)."""
    return module.materialize() if hasattr(type(module), "materialize") else module


def _threads(threads: int | None) -> int:
    return int(threads or torch.get_num_threads())


# ---------------------------------------------------------------- torch runtimes

def input_hw(size) -> tuple[int, int]:
    """``(height, width)`` of a runner's input ``size``: a side (square) or ``(height, width)``."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def size_tag(size) -> str:
    """``"224"`` for a square input, ``"256x192"`` (height x width) otherwise: cache file names and keys."""
    h, w = input_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """``(b, S, S, 3)`` uint8 → ``(b, 3, S, S)`` float32 in channels_last memory (no copy of layout)."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()


@RUNTIMES.register("eager")
def eager_runner(module: nn.Module, size: int, **_) -> Runner:
    module = module.eval().to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(to_tensor(batch)).float().numpy()

    return Runner("eager", run)


@RUNTIMES.register("bf16")
def bf16_runner(module: nn.Module, size: int, **_) -> Runner:
    module = module.eval().to(memory_format=torch.channels_last)
    if not has_native_bf16():
        warnings.warn("bf16 on a CPU without avx512_bf16/amx_bf16 is emulated and ~10x slower than "
                      "fp32; use runtime 'auto' or 'onnx'", RuntimeWarning, stacklevel=2)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(to_tensor(batch)).float().numpy()

    return Runner("bf16", run, {"native_bf16": has_native_bf16()})


@RUNTIMES.register("compile")
def compile_runner(module: nn.Module, size: int, **_) -> Runner:
    """``torch.compile``; the first call compiles, and any failure falls back to eager."""
    module = module.eval().to(memory_format=torch.channels_last)
    eager = eager_runner(module, size)
    state: dict = {"fn": None, "failed": None}
    try:
        state["fn"] = torch.compile(module, dynamic=None)
    except Exception as e:  # pragma: no cover - depends on the toolchain
        state["failed"] = f"{type(e).__name__}: {e}"

    def run(batch: np.ndarray) -> np.ndarray:
        if state["fn"] is not None:
            try:
                with torch.inference_mode():
                    return state["fn"](to_tensor(batch)).float().numpy()
            except Exception as e:  # inductor needs a C++ compiler, etc.
                state["fn"], state["failed"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if state["failed"]:
            warnings.warn(f"torch.compile failed ({state['failed']}); running eager", RuntimeWarning, stacklevel=2)
            state["failed"] = ""  # warn once
        return eager(batch)

    return Runner("compile", run)


# ---------------------------------------------------------------- CUDA

def cuda_available() -> bool:
    """True when torch sees a CUDA GPU."""
    return bool(torch.cuda.is_available())


def _cuda_runner(name: str, module: nn.Module, bf16: bool) -> Runner:
    if not cuda_available():
        raise RuntimeError(f"runtime '{name}' needs a CUDA GPU, and torch {torch.__version__} sees none "
                           f"(torch.cuda.is_available() is False); use runtime 'auto' or a CPU runtime "
                           f"(eager, onnx, bf16)")
    dev = torch.device("cuda")
    # a copy: the caller's stays on the CPU
    net = copy.deepcopy(_real(module)).eval().to(dev, memory_format=torch.channels_last)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def run(batch) -> np.ndarray:
        # uint8 (b,S,S,3) crosses the bus (4x fewer bytes than float), becomes (b,3,S,S) float there;
        # pixels decoded on the GPU (catalens.embed.gpu_decode) arrive as a tensor already there
        if isinstance(batch, torch.Tensor):
            x = batch.to(dev, non_blocking=True)
        else:
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(dev, non_blocking=True)
        with torch.inference_mode(), amp():
            y = net(x.permute(0, 3, 1, 2).float())
        return y.float().cpu().numpy()

    return Runner(name, run, {"device": torch.cuda.get_device_name(dev)})


@RUNTIMES.register("cuda")
def cuda_runner(module: nn.Module, size: int, **_) -> Runner:
    return _cuda_runner("cuda", module, bf16=False)


@RUNTIMES.register("cuda-bf16")
def cuda_bf16_runner(module: nn.Module, size: int, **_) -> Runner:
    return _cuda_runner("cuda-bf16", module, bf16=True)


# ---------------------------------------------------------------- ONNX Runtime

class _PixelsNHWC(nn.Module):
    """uint8 ``(b, S, S, 3)`` → the wrapped module's input ``(b, 3, S, S)`` float, in the graph."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2).float())


def onnx_path(fingerprint: str, size: int, cache_dir: str | Path | None = None) -> Path:
    return runtime_cache_dir(cache_dir) / f"{fingerprint}-s{size_tag(size)}.onnx"


def export_onnx(module: nn.Module, size: int, path: str | Path, opset: int = 17) -> Path:
    """Export ``module`` (pixels 0..255 NCHW float → features) as an ONNX graph taking uint8 NHWC
    pixels with a dynamic batch; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _PixelsNHWC(_real(module)).eval()
    example = torch.zeros((2, *input_hw(size), 3), dtype=torch.uint8)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), buf, dynamo=False, opset_version=opset,
                          input_names=["pixels"], output_names=["features"],
                          dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}})
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def ort_session(path: str | Path, threads: int, spin: bool = False):
    """An ONNX Runtime CPU session: ``threads`` intra-op threads, all graph optimisations.

    ``spin=False`` stops idle pool threads from busy-waiting, which would steal the cores that
    decode workers need.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _onnx_file(module: nn.Module, size: int, cache_dir, fingerprint: str | None) -> tuple[Path, bool]:
    """The cached ONNX export of ``module`` (exported now when missing); (path, exported now)."""
    path = onnx_path(fingerprint or module_fingerprint(module), size, cache_dir)
    if path.exists():
        return path, False
    export_onnx(module, size, path)
    return path, True


@RUNTIMES.register("onnx")
def onnx_runner(module: nn.Module, size: int, threads: int | None = None, cache_dir: str | Path | None = None,
                fingerprint: str | None = None, spin: bool = False, streams: int | None = None, **_) -> Runner:
    """ONNX Runtime fp32. ``streams`` single-threaded sessions each run a slice of every batch,
    in parallel (default: one per thread, ``threads`` = all cores): no barrier between threads
    inside each operator, so a decode worker pre-empting one thread does not stall the other."""
    threads = _threads(threads)
    streams = max(1, min(streams or threads, threads))
    t0 = time.perf_counter()
    path, exported = _onnx_file(module, size, cache_dir, fingerprint)
    per_session = max(1, threads // streams)
    try:
        sessions = [ort_session(path, per_session, spin) for _ in range(streams)]
    except Exception:
        if exported:
            raise
        export_onnx(module, size, path)  # a damaged cache file: export again
        exported = True
        sessions = [ort_session(path, per_session, spin) for _ in range(streams)]
    in_name = sessions[0].get_inputs()[0].name
    pool = ThreadPoolExecutor(streams, thread_name_prefix="ort-stream") if streams > 1 else None

    def run_one(sess, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([sess.run(None, {in_name: batch[s:s + ORT_MAX_BATCH]})[0]
                               for s in range(0, len(batch), ORT_MAX_BATCH)])

    def run(batch: np.ndarray) -> np.ndarray:   # (b, S, S, 3) uint8 -> (b, dim) float32
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if pool is None or len(batch) < 2 * streams:
            return run_one(sessions[0], batch)
        parts = np.array_split(batch, streams)  # ORT releases the GIL while it runs
        return np.concatenate(list(pool.map(run_one, sessions, parts)))

    return Runner("onnx", run, {"path": str(path), "exported": exported, "threads": threads, "streams": streams,
                                "setup_s": time.perf_counter() - t0})


# ---------------------------------------------------------------- OpenVINO

def _ov_runner(name: str, compiled, streams: int, info: dict) -> Runner:
    """Run a compiled OpenVINO model: a batch is split across ``streams`` infer requests that run
    in parallel (OpenVINO releases the GIL); each request serves one call at a time."""
    import queue

    idle: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(streams):
        idle.put(compiled.create_infer_request())
    pool = ThreadPoolExecutor(streams, thread_name_prefix="ov-stream") if streams > 1 else None

    def run_one(batch: np.ndarray) -> np.ndarray:
        try:
            req = idle.get_nowait()
        except queue.Empty:
            req = compiled.create_infer_request()
        try:
            req.infer({0: batch})
            return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)
        finally:
            idle.put(req)

    def run(batch: np.ndarray) -> np.ndarray:   # (b, S, S, 3) uint8 -> (b, dim) float32
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if pool is None or len(batch) < 2 * streams:
            return run_one(batch)
        return np.concatenate(list(pool.map(run_one, np.array_split(batch, streams))))

    return Runner(name, run, info)


@RUNTIMES.register("openvino")
def openvino_runner(module: nn.Module, size: int, threads: int | None = None, cache_dir: str | Path | None = None,
                    fingerprint: str | None = None, streams: int | None = None, **_) -> Runner:
    """OpenVINO fp32 on the CPU, from the cached ONNX export (exported now when missing).

    ``streams`` (default 1) parallel infer requests share ``threads`` threads."""
    if not openvino_available():
        raise RuntimeError("runtime 'openvino' needs the openvino package: pip install 'catalens[fast]' "
                           "(or use runtime 'auto', 'onnx' or 'eager')")
    threads = _threads(threads)
    streams = max(1, min(streams or 1, threads))
    t0 = time.perf_counter()
    path, exported = _onnx_file(module, size, cache_dir, fingerprint)
    core = _ov_core(cache_dir)
    try:
        compiled = core.compile_model(str(path), "CPU", _ov_config(threads, streams))
    except Exception:
        if exported:
            raise
        export_onnx(module, size, path)  # a damaged cache file: export again
        exported = True
        compiled = core.compile_model(str(path), "CPU", _ov_config(threads, streams))
    return _ov_runner("openvino", compiled, streams, {"path": str(path), "exported": exported, "threads": threads,
                                                      "streams": streams, "setup_s": time.perf_counter() - t0})


def openvino_int8_path(fingerprint: str, size: int, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`quantize_openvino` writes the int8 model (``.xml`` + ``.bin``)."""
    return runtime_cache_dir(cache_dir) / f"{fingerprint}-s{size_tag(size)}-int8.xml"


def quantize_openvino(module: nn.Module, size: int, pixels: np.ndarray, cache_dir: str | Path | None = None,
                      fingerprint: str | None = None, fast_bias_correction: bool = True,
                      overflow_fix: bool | None = None) -> Path:
    """Quantise ``module`` to int8 with NNCF post-training quantisation, calibrated on ``pixels``
    (``(n, S, S, 3)`` uint8 decoded *real* photos, a few hundred; the activation ranges come from
    them). Writes the OpenVINO model atomically to :func:`openvino_int8_path` and returns it.

    ``overflow_fix`` (default: on where the CPU has no VNNI, :func:`has_vnni`) gives every layer's weights
    7 bits instead of 8, as NNCF's ``OverflowFix.ENABLE``; its default fixes only the first layer. On an
    AVX2-only CPU (AMD Zen 3) the saturated sums otherwise cost accuracy: Lite0 on 24 clothing photos it was not
    calibrated on, lowest cosine to fp32 0.894 with the default, 0.937 with the fix (0.945 with the default on a
    VNNI CPU); ``tests/test_engine.py::test_openvino_int8_calibrated_on_real_photos``. Like ONNX Runtime's
    ``reduce_range`` (:mod:`catalens.export.quantize`), it is chosen for the CPU that calibrates, where the
    runtime cache (per machine) is used."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[1:] != (*input_hw(size), 3) or pixels.dtype != np.uint8:
        h, w = input_hw(size)
        raise ValueError(f"calibration pixels must be uint8 (n, {h}, {w}, 3), got {pixels.dtype} "
                         f"{tuple(pixels.shape)}: decode real photos with catalens.ingest.images.load_rgb")
    fingerprint = fingerprint or module_fingerprint(module)
    path, _ = _onnx_file(module, size, cache_dir, fingerprint)
    model = ov.Core().read_model(str(path))
    batches = [pixels[s:s + 8] for s in range(0, len(pixels), 8)]
    if overflow_fix is None:
        overflow_fix = not has_vnni()
    fix = OverflowFix.ENABLE if overflow_fix else OverflowFix.FIRST_LAYER
    q = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),  # samples = batches of 8
                      fast_bias_correction=fast_bias_correction,
                      advanced_parameters=AdvancedQuantizationParameters(overflow_fix=fix))
    out = openvino_int8_path(fingerprint, size, cache_dir)
    tmp = out.with_name(f"tmp{os.getpid()}-{out.name}")
    ov.save_model(q, str(tmp), compress_to_fp16=False)
    os.replace(tmp.with_suffix(".bin"), out.with_suffix(".bin"))
    os.replace(tmp, out)
    return out


@RUNTIMES.register("openvino-int8")
def openvino_int8_runner(module: nn.Module, size: int, threads: int | None = None,
                         cache_dir: str | Path | None = None, fingerprint: str | None = None,
                         streams: int | None = None, **_) -> Runner:
    """OpenVINO int8 from the model :func:`quantize_openvino` calibrated on real photos."""
    if not openvino_available():
        raise RuntimeError("runtime 'openvino-int8' needs the openvino package: pip install 'catalens[fast]'")
    threads = _threads(threads)
    streams = max(1, min(streams or 1, threads))
    fingerprint = fingerprint or module_fingerprint(module)
    path = openvino_int8_path(fingerprint, size, cache_dir)
    if not path.exists():
        raise RuntimeError(f"runtime 'openvino-int8' needs a model calibrated on real photos, and {path} does not "
                           f"exist: run 'catalens export MODEL --openvino-int8' (calibrates on the model's training "
                           f"photos; in Python catalens.embed.runtimes.quantize_openvino(module, {size}, pixels) on "
                           f"a few hundred decoded photos), or use runtime 'openvino'")
    t0 = time.perf_counter()
    compiled = _ov_core(cache_dir).compile_model(str(path), "CPU", _ov_config(threads, streams, precision=None))
    return _ov_runner("openvino-int8", compiled, streams, {"path": str(path), "threads": threads, "streams": streams,
                                                           "setup_s": time.perf_counter() - t0})


# ---------------------------------------------------------------- auto

def measure_runner(runner, size: int, batch: int = 8, budget_s: float = 0.6, seed: int = 0,
                   warmup: bool = True) -> float:
    """Images/s of ``runner`` on random pixels: an optional 2-image warm-up, then batches of
    ``batch`` until ``budget_s`` is spent (at least one); the best batch counts (robust to
    other processes' bursts)."""
    x = np.random.default_rng(seed).integers(0, 256, (batch, *input_hw(size), 3), dtype=np.uint8)
    if warmup:
        runner(x[:2])
    best, spent = 0.0, 0.0
    while True:
        t = time.perf_counter()
        runner(x)
        dt = time.perf_counter() - t
        best, spent = max(best, batch / dt), spent + dt
        if spent >= budget_s:
            return best


#: bumped when catalens changes which candidates can run (the export): a choice remembered before is measured again.
#: 2: a member cropped from an ensemble's shared decode is traced into ONNX (it failed, and 'auto' remembered eager)
EXPORT_REVISION = 2


def _auto_key(fingerprint: str, size: int, threads: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    vers = []
    for pkg in ("torch", "onnxruntime", "openvino"):
        try:
            vers.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            pass
    return f"{fingerprint}|s{size_tag(size)}|{cpu_model()}|threads={threads}|{','.join(vers)}|export={EXPORT_REVISION}"


def _choices_file(cache_dir) -> Path:
    return runtime_cache_dir(cache_dir) / "auto-choices.json"


def remembered_choice(fingerprint: str, size: int, threads: int, cache_dir=None) -> dict | None:
    f = _choices_file(cache_dir)
    try:
        return json.loads(f.read_text()).get(_auto_key(fingerprint, size, threads))
    except (OSError, ValueError):
        return None


def _remember(fingerprint: str, size: int, threads: int, cache_dir, entry: dict) -> None:
    f = _choices_file(cache_dir)
    f.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        data = {}
    data[_auto_key(fingerprint, size, threads)] = entry
    tmp = f.with_name(f.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, f)


def choose_runtime(module: nn.Module, size: int, threads: int | None = None, cache_dir=None,
                   fingerprint: str | None = None, candidates: list[str] | None = None,
                   budget_s: float = 2.5, remeasure: bool = False) -> tuple[Runner, dict]:
    """Build the fastest of ``candidates`` (default :func:`auto_candidates`) for this machine.

    Returns ``(runner, entry)``; ``entry`` holds the choice and the measured img/s. A remembered
    choice is reused without measuring unless ``remeasure``.
    """
    threads = _threads(threads)
    fingerprint = fingerprint or module_fingerprint(module)
    opts = dict(threads=threads, cache_dir=cache_dir, fingerprint=fingerprint)
    if not remeasure:
        entry = remembered_choice(fingerprint, size, threads, cache_dir)
        if entry and entry.get("runtime") in RUNTIMES:
            try:
                return RUNTIMES.create(entry["runtime"], module, size, **opts), dict(entry, remembered=True)
            except Exception as e:  # e.g. onnxruntime uninstalled since: measure again
                warnings.warn(f"remembered runtime '{entry['runtime']}' failed ({e}); measuring again",
                              RuntimeWarning, stacklevel=2)
    cands = [c for c in (candidates or auto_candidates()) if c in RUNTIMES and c != "auto"]
    runners: dict[str, Runner] = {}
    errors: dict[str, str] = {}
    for c in cands:
        try:
            runners[c] = RUNTIMES.create(c, module, size, **opts)
        except Exception as e:
            errors[c] = f"{type(e).__name__}: {e}"
    if not runners:
        raise RuntimeError(f"no usable runtime among {cands}: {errors}")
    # warm-up (first-call costs) and a per-image estimate, then two interleaved rounds of one
    # batch each: a burst from another process hits all candidates alike
    x2 = _probe_pixels(size)
    t0 = time.perf_counter()
    per_img, outputs = {}, {}
    for c, r in runners.items():
        r(x2)
        t = time.perf_counter()
        outputs[c] = r(x2)
        per_img[c] = (time.perf_counter() - t) / 2
    fidelity = _fidelity_gate(runners, outputs, errors)
    share = max(0.05, budget_s - (time.perf_counter() - t0)) / (2 * len(runners))
    batch = int(np.clip(share / max(max(per_img.values()), 1e-6), 2, 16))
    rates = {c: 0.0 for c in runners}
    for _ in range(2):
        for c, r in runners.items():
            rates[c] = max(rates[c], measure_runner(r, size, batch=batch, budget_s=0.0, warmup=False))
    best = next(iter(runners))
    for c in runners:
        margin = AUTO_MARGIN * (LOSSY_MARGIN if c in LOSSY_MIN_COSINE and best not in LOSSY_MIN_COSINE else 1.0)
        if rates[c] > rates[best] * margin:
            best = c
    entry = {"runtime": best, "img_per_s": {c: round(v, 2) for c, v in rates.items()},
             "errors": errors, "min_cosine_vs_fp32": fidelity, "batch": batch,
             "measure_s": round(time.perf_counter() - t0, 2), "threads": threads,
             "cpu": cpu_model(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _remember(fingerprint, size, threads, cache_dir, entry)
    return runners[best], dict(entry, remembered=False)


def _probe_pixels(size: int) -> np.ndarray:
    """Two smooth, photo-like test images (gradients, a disc, stripes), ``(2, S, S, 3)`` uint8."""
    h, w = input_hw(size)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([max(h - 1, 1), max(w - 1, 1)], dtype=float)[:, None, None]
    disc = ((xx - 0.5) ** 2 + (yy - 0.45) ** 2 < 0.08)
    a = np.stack([200 * xx + 30, 180 * yy + 40, 120 + 80 * disc], -1)
    b = np.stack([128 + 100 * np.sin(12 * xx), 90 + 60 * yy, 220 - 150 * disc], -1)
    return np.clip(np.stack([a, b]), 0, 255).astype(np.uint8)


def _fidelity_gate(runners: dict, outputs: dict, errors: dict) -> dict:
    """Drop lossy runners whose features drift from an exact one's (``LOSSY_MIN_COSINE``);
    returns the measured min cosine per lossy runtime."""
    exact = next((c for c in runners if c not in LOSSY_MIN_COSINE), None)
    out = {}
    for c in [c for c in runners if c in LOSSY_MIN_COSINE]:
        if exact is None:
            continue
        cos = float(_row_cosines(outputs[exact], outputs[c]).min())
        out[c] = round(cos, 5)
        if cos < LOSSY_MIN_COSINE[c]:
            errors[c] = f"accuracy check failed: min feature cosine vs {exact} {cos:.4f} < {LOSSY_MIN_COSINE[c]}"
            del runners[c]
    return out


@RUNTIMES.register("auto")
def auto_runner(module: nn.Module, size: int, threads: int | None = None, cache_dir=None,
                fingerprint: str | None = None, **_) -> Runner:
    if cuda_available():
        runner = cuda_runner(module, size)
        runner.info = dict(runner.info, auto={"runtime": "cuda", "reason": "a CUDA GPU is present",
                                              "device": runner.info["device"]})
        return runner
    runner, entry = choose_runtime(module, size, threads, cache_dir, fingerprint)
    runner.info = dict(runner.info, auto=entry)
    return runner


def make_runner(name: str, module: nn.Module, size: int, **opts) -> Runner:
    """Build the runner registered as ``name`` (``opts``: threads, cache_dir, fingerprint, spin)."""
    return RUNTIMES.create(name, module, size, **opts)


# ---------------------------------------------------------------- parity

def runtime_parity(backbone, pixels: np.ndarray, runtime: str, head=None, batch_size: int = 32,
                   **opts) -> dict:
    """Compare ``runtime`` with eager on ``pixels`` ``(n, S, S, 3)`` uint8 (real photos).

    ``backbone`` is a :class:`~catalens.embed.backbones.Backbone` (or a module taking 0..255
    NCHW floats). Reports the max / mean absolute feature difference, the max difference
    relative to the largest eager feature, the lowest cosine similarity, and the agreement of
    nearest neighbours among the images. With ``head`` (features ndarray → scores ndarray) it
    also reports the top-1 agreement of the downstream predictions: the accuracy check for
    lossy runtimes such as bf16.
    """
    module = getattr(backbone, "module", backbone)
    size = (int(pixels.shape[1]), int(pixels.shape[2]))
    size = size[0] if size[0] == size[1] else size
    if hasattr(backbone, "fingerprint") and "fingerprint" not in opts:
        opts["fingerprint"] = backbone.fingerprint()
    ref_runner = make_runner("eager", module, size)
    runner = make_runner(runtime, module, size, **opts)

    def run_all(r) -> np.ndarray:
        return np.concatenate([r(pixels[s:s + batch_size]) for s in range(0, len(pixels), batch_size)])

    ref, got = run_all(ref_runner), run_all(runner)
    diff = np.abs(ref.astype(np.float64) - got)
    cos = _row_cosines(ref, got)
    out = {"runtime": runtime, "ran": getattr(runner, "name", runtime), "images": int(len(pixels)),
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "max_rel_diff": float(diff.max() / max(np.abs(ref).max(), 1e-12)),
           "min_cosine": float(cos.min())}
    if len(pixels) > 2:
        out["nn_agreement"] = float((_nearest(ref) == _nearest(got)).mean())
    if head is not None:
        out["top1_agreement"] = float((np.asarray(head(ref)).argmax(-1) == np.asarray(head(got)).argmax(-1)).mean())
    return out


def _row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``got`` with the same row of ``ref``, ``(n,)``."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)


def _nearest(f: np.ndarray) -> np.ndarray:
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    s = f @ f.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op threads."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)

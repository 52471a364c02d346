"""Torch-free helpers shared by the OpenVINO runtimes and the exported-graph runner: whether
OpenVINO is installed, where compiled blobs and ONNX exports are cached, and the compile settings.
(``catalens.embed.runtimes`` imports torch; the one-photo path and the server must not need it.)"""
from __future__ import annotations

import os
from pathlib import Path


def openvino_available() -> bool:
    """True when the ``openvino`` package imports (``pip install catalens[fast]``)."""
    try:
        import openvino  # noqa: F401
        return True
    except ImportError:
        return False


def runtime_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where ONNX exports and ``auto`` choices live (default ``~/.cache/catalens/onnx``)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("CATALENS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "catalens")
    return Path(base) / "onnx"


def _ov_core(cache_dir):
    """An OpenVINO Core whose compiled-model cache lives next to the ONNX exports."""
    import openvino as ov

    core = ov.Core()
    blobs = runtime_cache_dir(cache_dir) / "openvino"
    blobs.mkdir(parents=True, exist_ok=True)
    core.set_property({"CACHE_DIR": str(blobs)})
    return core


def _ov_config(threads: int, streams: int, precision: str | None = "f32") -> dict:
    cfg = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": streams, "PERFORMANCE_HINT": "LATENCY",
           "ENABLE_CPU_PINNING": False}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    return cfg

"""Process-level set-up for fast, importable torch on CPU machines.

- :func:`import_timm` makes ``timm`` importable when a CUDA build of torchvision sits next to
  the CPU torch wheel (the ``torchvision::nms`` schema is missing there): it registers the
  ``nms``/``qnms`` schemas, only when they are absent.
- :func:`tune_malloc_env` returns the glibc malloc settings that avoid page-fault storms
  (1.3-2.7x faster inference on the target VMs); they must be in the environment before the
  process starts, so the CLI re-executes itself once with them (see ``catalens.cli``).
- :func:`streaming_malloc` switches glibc to a fixed 1 MiB mmap threshold at run time when
  inference runs outside torch (ONNX Runtime has its own arena): big buffers (decoded photos)
  then go back to the system at once. With the 256 MiB threshold above, decode threads
  fragment the heap and a 40,000-row predict swung between 1.3 and 3.3 GB of RSS; with 1 MiB
  it stayed at ~600 MB, at no cost to ONNX Runtime (torch eager, by contrast, runs ~1.8x
  slower with it, so torch runtimes keep the high threshold).
- :func:`set_threads` sizes torch's pools from the CPUs this process may use.
"""
from __future__ import annotations

import os

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STREAMING_MMAP_THRESHOLD = 1 << 20
STREAMING_TRIM_THRESHOLD = 128 << 20


def available_cpus() -> int:
    """CPUs this process may run on (respects affinity / cgroups)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def streaming_malloc() -> bool:
    """Fixed 1 MiB mmap / 128 MiB trim thresholds for this process (glibc only); True if set."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, STREAMING_TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False


def tune_malloc_env(env: dict | None = None) -> dict:
    """A copy of ``env`` (default ``os.environ``) with the malloc settings added if absent."""
    out = dict(os.environ if env is None else env)
    for k, v in MALLOC_ENV.items():
        out.setdefault(k, v)
    return out


def _register_torchvision_schemas() -> None:
    import torch

    try:
        torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "CPU")
        has = torch._C._dispatch_find_schema_or_throw("torchvision::nms", "") is not None
    except Exception:
        has = False
    if has:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")  # noqa: kept alive by the dispatcher
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _KEEP.append(lib)


_KEEP: list = []


def _import_with_nms_shim(name: str, drop: tuple[str, ...]):
    """Import ``name``; when torchvision's ``nms`` op schema is missing (a CUDA torchvision beside a
    CPU torch), drop the half-imported ``drop`` modules, register the schemas and import again."""
    import importlib
    import sys

    try:
        return importlib.import_module(name)
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for mod in [m for m in sys.modules if m.startswith(drop)]:
        del sys.modules[mod]
    _register_torchvision_schemas()
    return importlib.import_module(name)


def import_timm():
    """Import and return ``timm``, patching the torchvision op schemas only when needed."""
    return _import_with_nms_shim("timm", ("torchvision", "timm"))


def import_torchvision():
    """Import and return ``torchvision`` with the same ``nms`` schema patch as :func:`import_timm`."""
    return _import_with_nms_shim("torchvision", ("torchvision",))


def set_threads(n: int | None = None) -> int:
    """Set torch intra-op threads to ``n`` (default: available CPUs); returns the count."""
    import torch

    n = n or available_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n

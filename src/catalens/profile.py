"""What a network costs: parameters, MACs/FLOPs per layer, measured time per layer, size on
disk, load time, and latency / throughput per inference runtime.

:func:`profile_module` works on any ``nn.Module`` that takes ``(n, 3, S, S)`` pixels in 0..255
(a :class:`~catalens.embed.backbones.FeatureExtractor`, a model folder's pixel model, ...);
:func:`profile_target` resolves a backbone name or a model folder and adds how long it takes
to build. ``catalens profile`` prints :func:`format_report` and can write the dict as JSON.

Counting rules (per image, batch 1):

- MACs are exact for ``Conv1d/2d/3d`` (``out_elements * in_channels / groups * prod(kernel)``)
  and ``Linear`` (``out_elements * in_features``), taken with forward hooks.
- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmul-like ops, 2 per MAC;
  it also sees attention matmuls the MAC hooks do not).
- Layer times are self times (a module's own forward minus its children's) measured with
  forward pre/post hooks in eager fp32 at the profiling batch size.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Exact multiply-accumulates of one call of a conv / linear layer producing ``out``."""
    if isinstance(module, _CONVS):
        return int(out.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size))
    if isinstance(module, nn.Linear):
        return int(out.numel() * module.in_features)
    return 0


def _rows(module: nn.Module) -> dict[str, nn.Module]:
    """Named modules, root as ``""``."""
    return dict(module.named_modules())


def count_macs_flops(module: nn.Module, input_size: int, channels: int = 3) -> dict[str, dict]:
    """Per-module ``params`` (own), ``macs`` and ``flops`` (self, not children) and output shape,
    for one image; key ``""`` is the whole module (totals)."""
    from torch.utils.flop_counter import FlopCounterMode

    mods = _rows(module)
    stats = {name: {"type": type(m).__name__, "params": sum(p.numel() for p in m.parameters(recurse=False)),
                    "macs": 0, "flops": 0, "out_shape": None, "called": False} for name, m in mods.items()}
    handles = []

    def hook(name):
        def fn(m, inp, out):
            st = stats[name]
            st["called"] = True
            if isinstance(out, torch.Tensor):
                st["out_shape"] = list(out.shape[1:])
                st["macs"] += layer_macs(m, out)
        return fn

    for name, m in mods.items():
        handles.append(m.register_forward_hook(hook(name)))
    x = torch.full((1, channels, input_size, input_size), 127.0)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    root = type(module).__name__
    inclusive = {}
    for key, ops in fc.get_flop_counts().items():
        if key == "Global":
            continue
        name = "" if key == root else key[len(root) + 1:] if key.startswith(root + ".") else None
        if name is not None and name in stats:
            inclusive[name] = int(sum(ops.values()))
    for name in stats:
        inc = inclusive.get(name, 0)
        children = sum(inclusive.get(f"{name}.{c}" if name else c, 0) for c, _ in mods[name].named_children())
        stats[name]["flops"] = max(0, inc - children)
    stats[""]["total_flops"] = int(fc.get_total_flops())
    stats[""]["total_macs"] = int(sum(s["macs"] for s in stats.values()))
    stats[""]["total_params"] = int(sum(p.numel() for p in module.parameters()))
    return stats


def time_layers(module: nn.Module, input_size: int, batch: int = 8, reps: int = 3, channels: int = 3) -> dict[str, float]:
    """Mean self time (seconds) of every module's forward at ``batch`` images, eager fp32."""
    mods = _rows(module)
    inclusive = {name: 0.0 for name in mods}
    stack: list[float] = []

    def pre(name):
        def fn(m, inp):
            stack.append(time.perf_counter())
        return fn

    def post(name):
        def fn(m, inp, out):
            inclusive[name] += time.perf_counter() - stack.pop()
        return fn

    handles = []
    for name, m in mods.items():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    x = torch.randint(0, 256, (batch, channels, input_size, input_size)).float()
    module.eval()
    try:
        with torch.inference_mode():
            module(x)                      # warm-up: kernel selection, allocations
            for v in inclusive:
                inclusive[v] = 0.0
            for _ in range(reps):
                module(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in mods.items():
        children = sum(inclusive[f"{name}.{c}" if name else c] for c, _ in m.named_children())
        out[name] = max(0.0, inclusive[name] - children) / reps
    out["__total__"] = inclusive[""] / reps
    return out


def weights_on_disk(module: nn.Module) -> dict:
    """Bytes of the module's state dict written as safetensors, and the time to load it back."""
    from safetensors.torch import load_file, save_file

    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "weights.safetensors"
        save_file(state, str(f))
        size = f.stat().st_size
        t = time.perf_counter()
        loaded = load_file(str(f))
        module.load_state_dict(loaded, strict=False)
        load_s = time.perf_counter() - t
    return {"safetensors_bytes": int(size), "load_s": load_s}


def time_runtime(runtime: str, module: nn.Module, input_size: int, batch: int = 32, threads: int | None = None,
                 budget_s: float = 4.0, runtime_dir=None, fingerprint: str | None = None) -> dict:
    """Setup time, single-image latency and batched latency / throughput of one runtime."""
    from catalens.embed.runtimes import make_runner

    t = time.perf_counter()
    runner = make_runner(runtime, module, input_size, threads=threads, cache_dir=runtime_dir, fingerprint=fingerprint)
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, input_size, input_size, 3), dtype=np.uint8)
    many = rng.integers(0, 256, (batch, input_size, input_size, 3), dtype=np.uint8)
    runner(one)
    setup_s = time.perf_counter() - t

    def timed(x, limit):
        runner(x)  # warm-up for this shape
        times, spent = [], 0.0
        while len(times) < 3 or (spent < limit and len(times) < 50):
            t0 = time.perf_counter()
            runner(x)
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
            if spent > 3 * limit:
                break
        return times

    single = timed(one, budget_s * 0.3)
    batched = timed(many, budget_s * 0.7)
    med_b = statistics.median(batched)
    return {"runtime": runtime, "ran": getattr(runner, "name", runtime), "setup_s": setup_s,
            "single_ms": 1e3 * statistics.median(single), "single_img_per_s": 1.0 / statistics.median(single),
            "batch": batch, "batch_ms": 1e3 * med_b, "batch_img_per_s": batch / med_b,
            "best_batch_img_per_s": batch / min(batched), "runs": [len(single), len(batched)]}


def profile_module(module: nn.Module, input_size: int, batch: int = 32, runtimes=("eager", "onnx"),
                   threads: int | None = None, top: int = 10, layer_batch: int | None = None,
                   runtime_dir=None, fingerprint: str | None = None, layers: bool = True,
                   channels: int = 3) -> dict:
    """Everything above for ``module`` (pixels ``(n, 3, S, S)`` in 0..255 with ``S = input_size``).

    Returns a JSON-able dict: ``totals``, ``layers`` (every module with parameters or compute),
    ``top_layers`` (the ``top`` slowest by measured self time), ``disk``, ``runtimes``.
    """
    from catalens.embed.runtimes import torch_threads

    threads = threads or torch.get_num_threads()
    report: dict = {"input_size": input_size, "batch": batch, "threads": threads}
    with torch_threads(threads):
        stats = count_macs_flops(module, input_size, channels)
        root = stats[""]
        if list(module.children()):
            stats.pop("")
        report["totals"] = {"params": root["total_params"], "macs": root["total_macs"],
                            "flops": root["total_flops"], "gmacs": root["total_macs"] / 1e9,
                            "gflops": root["total_flops"] / 1e9, "type": root["type"]}
        times = time_layers(module, input_size, layer_batch or min(batch, 8), channels=channels) if layers else {}
        total_t = times.pop("__total__", 0.0)
        rows = []
        for name, st in stats.items():
            if not st["called"] or not (st["params"] or st["macs"] or st["flops"] or times.get(name, 0) > 0):
                continue
            rows.append({"name": name or "(root)", "type": st["type"], "out_shape": st["out_shape"], "params": st["params"],
                         "macs": st["macs"], "flops": st["flops"],
                         "ms": 1e3 * times.get(name, 0.0) if layers else None,
                         "time_share": times.get(name, 0.0) / total_t if total_t else None})
        report["layers"] = rows
        if layers:
            report["layer_batch"] = layer_batch or min(batch, 8)
            report["layers_total_ms"] = 1e3 * total_t
            report["top_layers"] = sorted(rows, key=lambda r: -r["ms"])[:top]
        report["disk"] = weights_on_disk(module)
        report["runtimes"] = {}
        for rt in runtimes:
            try:
                report["runtimes"][rt] = time_runtime(rt, module, input_size, batch, threads,
                                                      runtime_dir=runtime_dir, fingerprint=fingerprint)
            except Exception as e:  # a runtime that cannot run here is reported, not fatal
                report["runtimes"][rt] = {"runtime": rt, "error": f"{type(e).__name__}: {e}"}
    return report


def profile_target(target: str, weights: str | None = None, **kw) -> dict:
    """Profile a backbone name (registry or timm, ``weights`` as in ``create_backbone``) or a
    model folder (``model.json`` + ``backbone.safetensors``)."""
    from catalens.embed.backbones import read_state_dict
    from catalens.embed.factory import backbone_from_description, create_backbone

    t = time.perf_counter()
    folder = Path(target)
    if folder.is_dir():
        meta_file = folder / "model.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"'{folder}' is not a model folder (no model.json); give a model folder "
                                    f"or a backbone name such as efficientnet_lite0")
        meta = json.loads(meta_file.read_text())
        desc = dict(meta["backbone"])
        desc.setdefault("weights_origin", f"model folder {folder.name}")
        desc.setdefault("name", desc.get("arch"))
        wfile = folder / "backbone.safetensors"
        backbone = backbone_from_description(desc, read_state_dict(wfile))
        source = {"kind": "model_folder", "path": str(folder), "backbone_file_bytes": wfile.stat().st_size}
    else:
        backbone = create_backbone(target, weights)
        source = {"kind": "backbone", "name": target, "weights": weights}
    build_s = time.perf_counter() - t
    kw.setdefault("fingerprint", backbone.fingerprint())
    report = profile_module(backbone.module, backbone.preprocess.size, **kw)
    report["source"] = source
    report["backbone"] = backbone.describe()
    report["build_s"] = build_s
    return report


# ------------------------------------------------------------------ printing

def _fmt_int(n) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def text_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in cells:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def format_report(rep: dict, max_layers: int = 40) -> str:
    t = rep["totals"]
    parts = []
    title = rep.get("backbone", {}).get("name") or t["type"]
    parts.append(f"{title}: input {rep['input_size']}x{rep['input_size']}, {rep['threads']} threads")
    parts.append(text_table(["total", "value"], [
        ["parameters", f"{t['params']:,}"], ["MACs / image", f"{t['macs']:,} ({t['gmacs']:.3f} G)"],
        ["FLOPs / image", f"{t['flops']:,} ({t['gflops']:.3f} G)"],
        ["weights on disk (safetensors)", f"{rep['disk']['safetensors_bytes'] / 2**20:.2f} MiB"],
        ["load weights (safetensors)", f"{1e3 * rep['disk']['load_s']:.1f} ms"],
        *([["build (create/read)", f"{1e3 * rep['build_s']:.0f} ms"]] if "build_s" in rep else []),
    ]))
    rows = rep["layers"]
    shown = sorted(rows, key=lambda r: -(r["macs"] or r["flops"] / 2))[:max_layers]
    shown.sort(key=lambda r: [i for i, x in enumerate(rows) if x is r][0])
    parts.append(f"layers ({len(shown)} of {len(rows)} with the most MACs, in network order)")
    parts.append(text_table(["layer", "type", "out", "params", "MACs", "FLOPs", "ms"],
                            [[r["name"], r["type"], "x".join(map(str, r["out_shape"] or [])), _fmt_int(r["params"]),
                              _fmt_int(r["macs"]), _fmt_int(r["flops"]),
                              "" if r["ms"] is None else f"{r['ms']:.2f}"] for r in shown]))
    if rep.get("top_layers"):
        parts.append(f"slowest layers (self time, eager fp32, batch {rep['layer_batch']}; "
                     f"whole forward {rep['layers_total_ms']:.1f} ms)")
        parts.append(text_table(["layer", "type", "ms", "share", "MACs", "GMAC/s"],
                                [[r["name"], r["type"], f"{r['ms']:.2f}", f"{100 * (r['time_share'] or 0):.1f}%",
                                  _fmt_int(r["macs"]),
                                  f"{r['macs'] * rep['layer_batch'] / (r['ms'] / 1e3) / 1e9:.2f}" if r["macs"] and r["ms"] else ""]
                                 for r in rep["top_layers"]]))
    rts = rep.get("runtimes", {})
    if rts:
        parts.append(f"runtimes (batch {rep['batch']})")
        rows = []
        for name, r in rts.items():
            if "error" in r:
                rows.append([name, "error: " + r["error"][:80], "", "", "", ""])
            else:
                rows.append([name if r["ran"] == name else f"{name} ({r['ran']})", f"{r['setup_s']:.2f}",
                             f"{r['single_ms']:.1f}", f"{r['single_img_per_s']:.1f}", f"{r['batch_ms']:.0f}",
                             f"{r['batch_img_per_s']:.1f}"])
        parts.append(text_table(["runtime", "setup s", "1 image ms", "1 image img/s", "batch ms", "batch img/s"], rows))
    return "\n\n".join(parts)

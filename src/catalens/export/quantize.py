"""Static int8 quantisation (QDQ) of an exported graph, calibrated on real training photos.

``quantize_int8(MODEL)`` reads ``MODEL/model.onnx`` (exported first if missing), decodes up to
``n_calibration`` photos of the training split of the data the model was trained on
(``model.json: data``, or ``calibration=DATA``), calibrates activation ranges on them (MinMax),
and writes ``MODEL/model.int8.onnx`` with QuantizeLinear/DequantizeLinear pairs around the
backbone's Conv/Add/Clip/pooling (weights int8 per channel, activations uint8). The heads
(Gemm) and the final softmax/sigmoid stay in float.

Then it measures what was lost and gained, on photos the calibration did not see (test split,
else validation): top-1 agreement with the fp32 graph per class task, accuracy per class task
when labels exist (fp32 and int8), tag-decision agreement, max |diff| of probabilities, and
batch-32 throughput of both graphs on this machine. The report is stored in
``model.int8.json`` and under ``int8`` in ``onnx.json``.

CPUs with AVX2 but no VNNI compute u8 x s8 products with saturating 16-bit sums; weights use
``reduce_range`` (7 bits) there to stay exact, as ONNX Runtime recommends (the openvino-int8 runtime likewise
calibrates with NNCF's overflow fix on every layer there: ``overflow_fix`` in its report).
"""
from __future__ import annotations

import logging
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from catalens.export.onnx import (INPUT_NAME, OnnxModel, _data_catalogue, _set_metadata, _versions, _write_json,
                                  decode_rows, default_onnx_path, ensure_onnx, file_sha256, read_description,
                                  sidecar_path, to_nchw)
from catalens.embed.runtimes import has_vnni
from catalens.files import apply_umask_mode

_logger = logging.getLogger(__name__)


# the backbone's ops; the heads (Gemm after the pooled features) and softmax/sigmoid stay float:
# they are a tiny part of the compute and carry the calibrated probabilities
QUANTIZED_OPS = ("Conv", "Add", "Clip", "Relu", "GlobalAveragePool")


class _Reader:
    """A CalibrationDataReader over decoded photos, in batches."""

    def __init__(self, pixels_hwc: np.ndarray, batch: int = 16) -> None:
        self.batches = [to_nchw(pixels_hwc[i:i + batch]) for i in range(0, len(pixels_hwc), batch)]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {INPUT_NAME: self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def throughput(m: OnnxModel, pixels_hwc: np.ndarray, batch: int = 32, seconds: float = 3.0) -> float:
    """Images per second of ``m`` on batches of ``batch`` photos (after one warm-up run)."""
    x = to_nchw(np.resize(pixels_hwc, (batch,) + pixels_hwc.shape[1:]))
    return _rate(m.run, x, seconds)


def runner_throughput(runner, pixels_hwc: np.ndarray, batch: int = 32, seconds: float = 3.0) -> float:
    """Images per second of an engine runner (``(b, S, S, 3)`` uint8 -> features) on batches of ``batch``."""
    return _rate(runner, np.ascontiguousarray(np.resize(pixels_hwc, (batch,) + pixels_hwc.shape[1:])), seconds)


def _rate(fn, x: np.ndarray, seconds: float) -> float:
    fn(x)   # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += len(x)
        if time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def compare(fp32: OnnxModel, int8: OnnxModel, pixels_hwc: np.ndarray, labels: dict | None, decode=None) -> dict:
    """Agreement and accuracy of the int8 graph against the fp32 graph on the same photos; ``decode``:
    probabilities -> ``{class task: (n,) answer index}`` for the tasks it decides (e.g. the model's
    ``decoder.decoded_index``: hierarchy decoding); each other class task's answer is its argmax."""
    a = fp32.run_hwc(pixels_hwc)
    b = int8.run_hwc(pixels_hwc)
    classes = [t.name for t in fp32.tasks if t.kind == "class"]

    def answers(p):
        return {**{k: p[k].argmax(1) for k in classes}, **(decode(p) if decode is not None else {})}

    ia, ib = (answers(a), answers(b)) if len(pixels_hwc) else ({}, {})
    out: dict = {"images": int(len(pixels_hwc)), "tasks": {}}
    for t in fp32.tasks:
        r: dict = {"max_abs_diff": float(np.abs(a[t.name] - b[t.name]).max()) if len(pixels_hwc) else 0.0}
        if t.kind == "class":
            r["top1_agreement"] = float((ia[t.name] == ib[t.name]).mean()) if len(pixels_hwc) else 1.0
            if labels is not None and t.name in labels:
                y = labels[t.name]
                known = y >= 0
                if known.any():
                    r["labelled"] = int(known.sum())
                    r["accuracy_fp32"] = float((ia[t.name][known] == y[known]).mean())
                    r["accuracy_int8"] = float((ib[t.name][known] == y[known]).mean())
                    r["accuracy_drop"] = r["accuracy_fp32"] - r["accuracy_int8"]
        else:
            thr = t.threshold_array()[None, :]
            r["decision_agreement"] = float(((a[t.name] >= thr) == (b[t.name] >= thr)).mean())
        out["tasks"][t.name] = r
    return out


def _calibration(model, calibration, n: int, seed: int):
    """``(catalogue, pixels)``: up to ``n`` decoded photos of the train split of ``calibration`` (default: the
    data the model was trained on); a clear error when there are none."""
    cat = _data_catalogue(calibration, model)
    if cat is None:
        raise ValueError(f"int8 calibration needs real photos: the model's training data "
                         f"'{model.meta.get('data')}' cannot be opened; give --calibration DATA "
                         f"(a photo folder or dataset file like the training data)")
    calib, _, _ = decode_rows(cat, model.preprocess, ("train", None), n, seed=seed)
    if len(calib) == 0:
        raise ValueError(f"no decodable photos in '{calibration or model.meta.get('data')}' for calibration")
    return cat, calib


def _held_out(model, eval_data, cat, calib: np.ndarray, limit: int | None, seed: int):
    """``(pixels, labels, split)`` to measure int8 on: up to ``limit`` photos of the test split of ``eval_data``
    (default ``cat``), else its val split; without either, the calibration photos (the report says so)."""
    ev_cat = _data_catalogue(eval_data, model) if eval_data is not None else cat
    pixels, _, labels = decode_rows(ev_cat, model.preprocess, ("test", "val"), limit, seed=seed + 1,
                                    with_labels=model.tasks)
    if len(pixels) == 0:
        return calib, None, "train (calibration photos; no test/val split)"
    return pixels, labels, "test" if ev_cat.has_split("test") else "val"


def _add_to_sidecar(graph: Path, key: str, report: dict) -> None:
    """Store ``report`` under ``key`` in the description beside ``graph`` (``onnx.json``), when there is one."""
    side = sidecar_path(graph)
    if side.exists():
        info = json.loads(side.read_text())
        info[key] = report
        _write_json(side, info)


def quantize_int8(model_dir: str | Path, out: str | Path | None = None, *, calibration: str | Path | None = None,
                  n_calibration: int = 128, eval_data: str | Path | None = None, eval_limit: int | None = 400,
                  speed_seconds: float = 3.0, reduce_range: bool | None = None, per_channel: bool = True,
                  seed: int = 0, log=None) -> dict:
    """Quantise ``MODEL/model.onnx`` to int8 and measure it; returns the report (also stored)."""
    log = log or _logger.info
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from catalens.model.load import load_model

    t0 = time.time()
    model_dir = Path(model_dir)
    fp32_path = ensure_onnx(model_dir, log=log)
    model = load_model(model_dir)
    out = Path(out) if out is not None else default_onnx_path(model_dir, int8=True)
    cat, calib = _calibration(model, calibration, n_calibration, seed)
    log(f"calibrating on {len(calib)} photos of '{calibration or model.meta.get('data')}' (train split)")
    if reduce_range is None:
        reduce_range = not has_vnni()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmpdir:
        prep = Path(tmpdir) / "prep.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prep), skip_symbolic_shape=True)
        except Exception as e:  # shape inference is an optimisation, not a requirement
            log(f"pre-processing skipped ({type(e).__name__}: {e})")
            prep = fp32_path
        tmp_out = Path(tmpdir) / "int8.onnx"
        quantize_static(str(prep), str(tmp_out), _Reader(calib), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        desc = read_description(fp32_path)
        desc = dict(desc, quantization={"format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8",
                                        "activations": "uint8", "reduce_range": reduce_range,
                                        "calibration_images": int(len(calib)), "method": "MinMax"})
        _set_metadata(tmp_out, desc)
        apply_umask_mode(tmp_out)
        os.replace(tmp_out, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")

    fp32, int8 = OnnxModel(fp32_path), OnnxModel(out)
    pixels, labels, split_used = _held_out(model, eval_data, cat, calib, eval_limit, seed)
    report = compare(fp32, int8, pixels, labels)
    report["split"] = split_used
    speed_px = pixels if len(pixels) else calib
    ips32 = throughput(fp32, speed_px, seconds=speed_seconds)
    ips8 = throughput(int8, speed_px, seconds=speed_seconds)
    report.update(file=out.name, sha256=file_sha256(out), bytes=out.stat().st_size,
                  fp32_bytes=fp32_path.stat().st_size, calibration_images=int(len(calib)),
                  calibration_data=str(calibration or model.meta.get("data")), reduce_range=reduce_range,
                  throughput_fp32_ips=ips32, throughput_int8_ips=ips8, speedup=ips8 / ips32,
                  speed_batch=32, threads=fp32.threads, seconds=round(time.time() - t0, 1),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=_versions())
    _write_json(sidecar_path(out), {"description": read_description(out), "int8": report})
    _add_to_sidecar(fp32_path, "int8", report)
    log(format_report(report))
    return report


def format_report(r: dict) -> str:
    head = (f"int8 vs fp32 on {r['images']} photos ({r['split']}): speed {r['throughput_fp32_ips']:.1f} -> "
            f"{r['throughput_int8_ips']:.1f} img/s (x{r['speedup']:.2f}, batch {r['speed_batch']}, "
            f"{r['threads']} threads); size {r['fp32_bytes'] / 1e6:.1f} -> {r['bytes'] / 1e6:.1f} MB")
    return "\n".join([head] + _task_lines(r))


# ----------------------------------------------------------------------------- the openvino-int8 runtime

class _RuntimeProbs:
    """``model``'s probabilities with its backbone run by the engine's ``runtime`` (what ``catalens predict
    --runtime RUNTIME`` computes, TTA views included): the shape :func:`compare` reads."""

    def __init__(self, model, runtime: str, runtime_dir=None) -> None:
        from catalens.embed.engine import EngineConfig, engine_runner

        self.model, self.tasks = model, model.tasks
        self.runner = engine_runner(model.backbone, EngineConfig(runtime=runtime, runtime_dir=runtime_dir,
                                                                 progress=False))

    def run_hwc(self, pixels_hwc: np.ndarray) -> dict[str, np.ndarray]:   # (n, S, S, 3) uint8 -> {task: (n, C)}
        feats = np.concatenate([self.runner(pixels_hwc[s:s + 32]) for s in range(0, len(pixels_hwc), 32)]) \
            if len(pixels_hwc) else np.zeros((0, self.model.backbone.feature_dim), np.float32)
        return self.model.predict_proba_features(feats)


def calibrate_openvino_int8(model_dir: str | Path, *, calibration: str | Path | None = None, n_calibration: int = 128,
                            eval_data: str | Path | None = None, eval_limit: int | None = 400, seed: int = 0,
                            runtime_dir: str | Path | None = None, speed_seconds: float = 3.0, log=None) -> dict:
    """Make ``--runtime openvino-int8`` usable for MODEL: NNCF post-training quantisation of the network the engine
    runs for its backbone (:func:`catalens.embed.runtimes.quantize_openvino`, into the runtime cache where predict,
    evaluate and serve look), calibrated on up to ``n_calibration`` photos of the training split; then measured
    against ``openvino`` fp32 on held-out photos (test split, else val) as :func:`compare` does, and for speed
    (the backbone's images per second, both runtimes on this CPU, ``speed_seconds`` each). The report is returned,
    logged, and stored under ``openvino_int8`` in ``MODEL/onnx.json`` when that file exists. A warning says so
    when int8 is not clearly faster here (:data:`INT8_WORTH`): on a CPU without VNNI it may not be."""
    log = log or _logger.info
    from catalens.embed.engine import runner_net
    from catalens.embed.runtimes import openvino_available, quantize_openvino
    from catalens.model.load import load_model

    if not openvino_available():
        raise RuntimeError("the openvino-int8 runtime needs the openvino and nncf packages: pip install "
                           "'catalens[fast]'")
    t0 = time.time()
    model_dir = Path(model_dir)
    model = load_model(model_dir)
    cat, calib = _calibration(model, calibration, n_calibration, seed)
    net = runner_net(model.backbone)   # (S, S, 3) uint8 pixels -> features, as the engine runs it
    log(f"calibrating openvino-int8 for {net.name} on {len(calib)} photos of "
        f"'{calibration or model.meta.get('data')}' (train split)")
    fix = not has_vnni()   # 7-bit weights in every layer where int8 sums saturate (no VNNI)
    path = quantize_openvino(net.module, net.preprocess.input_size, calib, cache_dir=runtime_dir,
                             fingerprint=net.fingerprint(), overflow_fix=fix)
    pixels, labels, split_used = _held_out(model, eval_data, cat, calib, eval_limit, seed)
    fp32 = _RuntimeProbs(model, "openvino", runtime_dir)
    int8 = _RuntimeProbs(model, "openvino-int8", runtime_dir)
    report = compare(fp32, int8, pixels, labels, decode=model.decoder.decoded_index)   # the answers predict gives
    speed_px = pixels if len(pixels) else calib
    ips32 = runner_throughput(fp32.runner, speed_px, seconds=speed_seconds)
    ips8 = runner_throughput(int8.runner, speed_px, seconds=speed_seconds)
    report.update(split=split_used, runtime="openvino-int8", file=str(path),
                  calibration_images=int(len(calib)), calibration_data=str(calibration or model.meta.get("data")),
                  overflow_fix=fix, throughput_fp32_ips=ips32, throughput_int8_ips=ips8, speedup=ips8 / ips32,
                  speed_batch=32, seconds=round(time.time() - t0, 1),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  versions=_versions())
    _add_to_sidecar(default_onnx_path(model_dir), "openvino_int8", report)
    log(format_agreement(report, "openvino-int8 vs openvino fp32")
        + f"\n  backbone speed {ips32:.1f} -> {ips8:.1f} img/s (x{ips8 / ips32:.2f}, batch 32)\n  wrote {path}")
    if ips8 / ips32 < INT8_WORTH:
        _logger.warning(slow_int8_message(ips8 / ips32, fix))
    return report


#: the speed-up under which the openvino-int8 runtime is not worth its answers moving (calibrate_openvino_int8 warns)
INT8_WORTH = 1.1


def slow_int8_message(speedup: float, overflow_fix: bool) -> str:
    """Why and what instead, when openvino-int8 is hardly faster than fp32 on this CPU."""
    why = (" (this CPU has no VNNI: int8 products are summed in saturating 16-bit lanes, so the weights keep 7 bits "
           "and int8 saves little)" if overflow_fix else "")
    return (f"openvino-int8 runs x{speedup:.2f} the speed of openvino fp32 on this CPU{why}; its answers move "
            f"without a gain here: keep --runtime auto (or openvino) on this machine")


def format_agreement(r: dict, title: str) -> str:
    """A :func:`compare` report under ``title``: one line per task."""
    return "\n".join([f"{title} on {r['images']} photos ({r['split']}):"] + _task_lines(r))


def _task_lines(r: dict) -> list[str]:
    lines = []
    for name, t in r["tasks"].items():
        if "top1_agreement" in t:
            s = f"  {name}: top-1 agreement {t['top1_agreement']:.3f}"
            if "accuracy_fp32" in t:
                s += (f", accuracy {t['accuracy_fp32']:.3f} (fp32) -> {t['accuracy_int8']:.3f} (int8) on "
                      f"{t['labelled']} labelled")
        else:
            s = f"  {name}: tag decision agreement {t['decision_agreement']:.3f}"
        lines.append(s + f", max |diff| {t['max_abs_diff']:.3f}")
    return lines

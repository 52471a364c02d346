"""catalens export MODEL --format onnx [--int8] [--out FILE]"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import bounded, nonneg_int, positive_int

    p = sub.add_parser("export", help="export a model folder to one ONNX graph (optionally int8)",
                       description="Export MODEL to ONNX: input 'pixels' uint8 (n, 3, S, S) RGB 0..255 after "
                                   "resize + centre crop; one float32 output per task with the probabilities in "
                                   "class order. Writes MODEL/model.onnx and MODEL/onnx.json (tasks, class order, "
                                   "thresholds, preprocess, parity with torch). --int8 also writes "
                                   "MODEL/model.int8.onnx (static QDQ quantisation calibrated on training photos) "
                                   "and reports its accuracy drop and speed-up; --openvino-int8 calibrates the "
                                   "openvino-int8 runtime of predict and evaluate the same way.")
    p.add_argument("model", help="model folder (from 'catalens train')")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", metavar="FILE", help="graph to write (default MODEL/model.onnx, with --int8 "
                                                 "MODEL/model.int8.onnx); its description goes beside it as .json")
    p.add_argument("--int8", action="store_true", help="also quantise to int8 (static, QDQ)")
    p.add_argument("--openvino-int8", action="store_true",
                   help="also calibrate the openvino-int8 runtime for this model (what 'catalens predict / evaluate "
                        "--runtime openvino-int8' run) on the calibration photos, and measure it against fp32 "
                        "(answers, and speed on this CPU)")
    p.add_argument("--calibration", metavar="DATA", help="photos to calibrate int8 on (default: the model's "
                                                          "training data, train split)")
    p.add_argument("--calibration-images", type=positive_int, default=128, help="photos used for calibration (default 128)")
    p.add_argument("--eval-limit", type=nonneg_int, default=400, help="held-out photos used to measure int8 (default 400)")
    p.add_argument("--parity-images", type=nonneg_int, default=16, help="decoded photos for the torch parity check")
    p.add_argument("--opset", type=bounded(int, 7, 30), default=17, help="ONNX opset (default 17)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from catalens.export.onnx import default_onnx_path, export_onnx

    from catalens.model.format import read_description

    model = Path(args.model)
    read_description(model)  # a clear error before anything heavy: missing folder, no or broken model.json
    fp32_out = Path(args.out) if args.out and not args.int8 else default_onnx_path(model)
    res = export_onnx(model, fp32_out, parity_n=args.parity_images, opset=args.opset)
    print(f"description: {res.sidecar}")
    rc = 0 if res.parity_ok else 1
    if not res.parity_ok:
        print(f"error: the ONNX graph disagrees with torch (max |diff| {res.parity['max_abs_diff']:.2e} >= "
              f"{res.parity['tolerance']:g}); do not serve it")
    if args.int8:
        from catalens.export.quantize import quantize_int8

        quantize_int8(model, args.out, calibration=args.calibration, n_calibration=args.calibration_images,
                      eval_limit=args.eval_limit)
    if args.openvino_int8:
        from catalens.export.quantize import calibrate_openvino_int8

        calibrate_openvino_int8(model, calibration=args.calibration, n_calibration=args.calibration_images,
                                eval_limit=args.eval_limit)
    return rc

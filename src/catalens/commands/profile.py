"""catalens profile MODEL_DIR|BACKBONE [--batch 32] [--json out.json]"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import nonneg_int, positive_int

    p = sub.add_parser("profile", help="parameters, MACs/FLOPs per layer, layer times, size, latency per runtime",
                       description="Profile a backbone (efficientnet_lite0/1/2 offline, any timm name with "
                                   "--weights random or FILE) or a model folder: parameters, MACs and FLOPs per "
                                   "layer and in total, measured time of the slowest layers, weights size as "
                                   "safetensors, load time, and single-image / batched latency and throughput "
                                   "for each runtime.")
    p.add_argument("target", help="model folder (with model.json) or backbone name")
    p.add_argument("--weights", metavar="FILE", help="backbone checkpoint, or 'random' (backbone names only)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size for batched latency (default 32)")
    p.add_argument("--runtimes", default="eager,onnx",
                   help="comma-separated runtimes to time (eager, onnx, compile, bf16, auto); default eager,onnx")
    p.add_argument("--threads", type=positive_int, help="inference threads (default: available cores)")
    p.add_argument("--top", type=nonneg_int, default=10, help="slowest layers to list (default 10)")
    p.add_argument("--layers", type=nonneg_int, default=40, help="layer rows to print (the JSON has all)")
    p.add_argument("--no-layer-times", action="store_true", help="skip timing every layer")
    p.add_argument("--json", metavar="FILE", help="write the whole profile as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from catalens.profile import format_report, profile_target
    from catalens.runtime import available_cpus

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    rep = profile_target(args.target, args.weights, batch=args.batch, runtimes=runtimes,
                         threads=args.threads or available_cpus(), top=args.top,
                         layers=not args.no_layer_times)
    print(format_report(rep, max_layers=args.layers))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1, default=str))
        print(f"\nwrote {out}")
    return 0

"""catalens evaluate MODEL DATA --report DIR"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options

    p = sub.add_parser("evaluate", help="metrics.json + report.html of a model on labelled data",
                       description="Evaluate MODEL on the test split of DATA (or all of DATA when it has no split).")
    p.add_argument("model", help="model folder")
    p.add_argument("data", help="photo folder or dataset file")
    p.add_argument("--report", required=True, help="report folder to write (metrics.json, report.html, plots)")
    add_config_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.evaluate.pipeline import evaluate_model
    from catalens.paths import check_output

    check_output(args.report, [args.data, args.model], flag="--report")
    evaluate_model(args.model, args.data, args.report, config_from_args(args))
    return 0

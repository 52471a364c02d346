"""catalens demo"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options, positive_int

    p = sub.add_parser("demo", help="generate a synthetic catalogue and run train → evaluate → predict",
                       description="The whole workflow on an embedded synthetic catalogue (drawn garments with "
                                   "category, department and pattern tags, a few deliberately broken files).")
    p.add_argument("--out", default="catalens-demo", help="folder for data, model, report, predictions")
    p.add_argument("--products", type=positive_int, default=300, help="number of synthetic products")
    add_config_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.demo import run_demo

    run_demo(args.out, args.products, config_from_args(args))
    return 0

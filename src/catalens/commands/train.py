"""catalens train DATA --out MODEL"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options

    p = sub.add_parser("train", help="train a multi-task model on a photo folder or dataset file",
                       description="Ingest and validate DATA, embed it (cached), fit the task heads, tune tag "
                                   "thresholds on val, and write a self-describing model folder.")
    p.add_argument("data", help="photo folder (one subfolder per class) or dataset file (.yaml)")
    p.add_argument("--out", required=True, help="model folder to write")
    add_config_options(p, training=True)
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.train.pipeline import train

    train(args.data, args.out, config_from_args(args))
    return 0

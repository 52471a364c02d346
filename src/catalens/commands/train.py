"""catalens train DATA --out MODEL"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options, positive_int

    p = sub.add_parser("train", help="train a multi-task model on a photo folder or dataset file",
                       description="Ingest and validate DATA, embed it (cached), fit the task heads, tune tag "
                                   "thresholds on val, and write a self-describing model folder.")
    p.add_argument("data", help="photo folder (one subfolder per class) or dataset file (.yaml)")
    p.add_argument("--out", required=True, help="model folder to write")
    add_config_options(p, training=True)
    p.add_argument("--target-precision", type=float, metavar="P",
                   help="precision the auto-accepted answers (<task>_accept) must reach: 95%% Clopper-Pearson "
                        "bound on held-out photos, threshold never under 1 - (1 - P) / 2 for photos from "
                        "other collections (default 0.98; see docs/decisions.md)")
    pr = p.add_argument_group("presets (see docs/presets.md)")
    pr.add_argument("--preset", choices=["fast", "medium", "best"],
                    help="fast: the plain model (default); medium/best: try the recipes catalens has, scored by "
                         "k-fold CV on train+val, combine the best, within --time-limit; writes OUT/leaderboard.csv")
    pr.add_argument("--time-limit", type=_duration, metavar="DURATION",
                    help="time budget of --preset medium/best, e.g. 20m, 90s, 1h, or seconds "
                         "(default 10m for medium, 20m for best)")
    ft = p.add_argument_group("fine-tuning (see docs/finetune.md; other knobs: --set finetune.KEY=VALUE)")
    ft.add_argument("--finetune", nargs="?", const="blocks", choices=["blocks", "all"],
                    help="also train the backbone: its last stage (blocks, the default; how many: "
                         "--set finetune.blocks=N, default 1) or all of it")
    ft.add_argument("--finetune-epochs", type=positive_int, metavar="N", help="fine-tuning epochs (default 6)")
    ft.add_argument("--resume", action="store_true",
                    help="resume the interrupted fine-tuning in OUT (an error when there is no checkpoint; "
                         "a matching checkpoint is resumed anyway without this flag)")
    ft.add_argument("--tta", action="append", metavar="VIEW", choices=["hflip", "zoom"],
                    help="test-time augmentation stored in the model: hflip and/or zoom (repeatable)")
    p.set_defaults(func=run)


def _duration(text: str) -> float:
    import argparse

    from catalens.train.presets import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.paths import check_output
    from catalens import distributed
    from catalens.train.presets import train_preset

    check_output(args.out, [args.data])   # a model folder inside a photo folder would become a class
    cfg = config_from_args(args)
    result = train_preset(args.data, args.out, cfg)
    if distributed.is_main():  # the MLflow run (off: tracking=false); never fails training
        from catalens.track import log_training

        log_training(result, cfg, data=args.data)
    if cfg.kfold.folds and distributed.is_main():  # under torchrun: once, by rank 0
        from catalens.train.kfold import cross_validate

        cross_validate(args.data, args.out, cfg)
    return 0

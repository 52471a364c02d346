"""catalens search DATA --trials N | --minutes M --out DIR"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options, nonneg_int, positive_float, positive_int

    p = sub.add_parser("search", help="search head (or --finetune) settings with Optuna (scored on val, or --cv K)",
                       description="Fit the task heads many times on the cached embeddings of the train split, "
                                   "score each on val (the test split is never read), and write the best run "
                                   "configuration as DIR/best_config.yaml for 'catalens train --config'. Searched: "
                                   "learning rate, weight decay, hidden width, dropout, label smoothing, class "
                                   "weighting, per-task loss weights. With --finetune blocks|all: the fine-tuning's "
                                   "learning rate, backbone multiplier, weight decay, label smoothing and epochs, "
                                   "each trial fine-tuning from one linear probe (views precomputed once).")
    p.add_argument("data", help="photo folder or dataset file")
    p.add_argument("--out", required=True, help="folder for best_config.yaml, trials.csv, search.json")
    p.add_argument("--trials", type=positive_int, metavar="N", help="number of trials")
    p.add_argument("--minutes", type=positive_float, metavar="M", help="time budget: no trial starts that the slowest so far says would end after it")
    p.add_argument("--cv", type=nonneg_int, default=0, metavar="K",
                   help="score each trial by K-fold cross-validation over train+val (K times slower; "
                        "steadier than a small val split)")
    p.add_argument("--objective", default="mean",
                   help="'mean' (class accuracy / tag mAP averaged over tasks, default) or one task's name")
    add_config_options(p, training=True)
    p.add_argument("--finetune", nargs="?", const="blocks", choices=["blocks", "all"],
                   help="search the fine-tuning's settings instead of the head's (the trained part: "
                        "--set finetune.blocks=N; the head stays as configured)")
    p.add_argument("--finetune-epochs", type=positive_int, metavar="N",
                   help="the starting number of fine-tuning epochs (trials try N/2 to 2N)")
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.train.search import search
    from catalens.paths import check_output

    if not args.trials and not args.minutes:
        raise ValueError("catalens search needs --trials N and/or --minutes M")
    check_output(args.out, [args.data])
    search(args.data, args.out, config_from_args(args), trials=args.trials, minutes=args.minutes,
           objective=args.objective, cv=args.cv)
    return 0

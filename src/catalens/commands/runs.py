"""catalens runs [--experiment NAME] [--compare RUN_ID ... | --leaderboard RUN_ID]"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("runs", help="list and compare tracked training runs (MLflow)",
                       description="List the MLflow runs of an experiment (newest first), compare runs side "
                                   "by side (params that differ, final metrics), or show the leaderboard of a "
                                   "--preset run. Runs are read from MLFLOW_TRACKING_URI, else the local store "
                                   "./runs/mlflow.db.")
    p.add_argument("--experiment", metavar="NAME", help="experiment (default MLFLOW_EXPERIMENT_NAME or 'catalens')")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--compare", nargs="+", metavar="RUN_ID", help="run ids (or unique prefixes) to compare")
    what.add_argument("--leaderboard", metavar="RUN_ID",
                      help="the leaderboard of a 'catalens train --preset medium|best' run (id or unique prefix)")
    p.add_argument("--all-params", action="store_true", help="with --compare: show every param, not only differing ones")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./runs)")
    p.set_defaults(func=run)


def run(args) -> int:
    import pandas as pd

    from catalens.track import compare_runs, list_runs, run_leaderboard

    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200,
                           "display.max_colwidth", 60):
        if args.leaderboard:
            print(run_leaderboard(args.leaderboard, args.experiment, args.tracking_uri).to_string(index=False))
            return 0
        if args.compare:
            df = compare_runs(args.compare, args.experiment, args.tracking_uri, all_params=args.all_params)
            print(df.to_string())
            return 0
        df = list_runs(args.experiment, args.tracking_uri)
        if df.empty:
            print(f"no runs in experiment '{args.experiment or 'catalens'}' (train a model first: "
                  f"catalens train DATA --out MODEL)")
            return 0
        print(df.to_string(index=False))
    return 0

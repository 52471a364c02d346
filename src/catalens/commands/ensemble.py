"""catalens ensemble MODEL... --out DIR [--weights w1,w2] [--data DATA] [--target-precision P]"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="combine several model folders into one ensemble model folder",
                       description="Write DIR, a model folder that predict, evaluate, export and serve accept: "
                                   "each MODEL is copied to DIR/members/N and their probabilities are averaged "
                                   "(weighted with --weights). Members must share task names and class orders.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders (two or more)")
    p.add_argument("--out", required=True, help="ensemble model folder to write")
    p.add_argument("--weights", help="comma-separated weight per model, e.g. 2,1,1 (default: equal)")
    p.add_argument("--data", help="the data the members were trained on, whose val photos set the ensemble's "
                                  "auto-accept and unknown thresholds (default: the first member's training "
                                  "data, from its model.json)")
    p.add_argument("--target-precision", type=float, default=None, metavar="P",
                   help="precision the auto-accept thresholds aim at (default 0.98)")
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.model.ensemble import build_ensemble
    from catalens.paths import check_output

    weights = None
    if args.weights:
        try:
            weights = [float(x) for x in args.weights.split(",")]
        except ValueError:
            raise ValueError(f"--weights expects numbers separated by commas, e.g. 2,1,1; got '{args.weights}'") from None
    check_output(args.out, args.models)   # never over (or inside) a member folder
    build_ensemble(args.models, args.out, weights, flags=_flags(args))
    return 0


def _flags(args):
    """The ensemble's accept / unknown thresholds on the val photos of ``--data`` (or of the first
    member's training data), or None (left null, with a warning) when there is no such data."""
    import json
    import logging
    from pathlib import Path

    from catalens.config import load_config
    from catalens.train.flags import ensemble_flags

    first = Path(args.models[0])
    data = args.data or json.loads((first / "model.json").read_text()).get("data")
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data '{args.data}' does not exist; give the data the members were trained on")
    if not data or not Path(data).exists():
        logging.getLogger(__name__).warning(
            f"ensemble: the members' training data ({data or 'not recorded'}) is not found: accept and unknown "
            f"thresholds are left null; give it with --data DATA")
        return None
    over = {"selective": {"target_precision": args.target_precision}} if args.target_precision is not None else {}
    cfg = load_config(None, [over])
    split_csv = first / "ingest" / "split.csv"
    return lambda ens: ensemble_flags(ens, data, cfg, split_csv if split_csv.exists() else None)

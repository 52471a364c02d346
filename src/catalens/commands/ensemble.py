"""catalens ensemble MODEL... --out DIR [--weights w1,w2]"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("ensemble", help="combine several model folders into one ensemble model folder",
                       description="Write DIR, a model folder that predict, evaluate, export and serve accept: "
                                   "each MODEL is copied to DIR/members/N and their probabilities are averaged "
                                   "(weighted with --weights). Members must share task names and class orders.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders (two or more)")
    p.add_argument("--out", required=True, help="ensemble model folder to write")
    p.add_argument("--weights", help="comma-separated weight per model, e.g. 2,1,1 (default: equal)")
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
    build_ensemble(args.models, args.out, weights)
    return 0

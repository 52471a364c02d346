"""catalens predict MODEL DATA --out predictions.parquet"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options

    p = sub.add_parser("predict", help="predict a whole catalogue to parquet (streaming, resumable)",
                       description="Predict every image of DATA with MODEL. Output columns per class task: "
                                   "TASK, TASK_prob, TASK_top_labels, TASK_top_probs; per tags task: TASK_tags "
                                   "and TASK_TAG_prob / TASK_TAG. Failed images are kept with 'problem' set.")
    p.add_argument("model", help="model folder")
    p.add_argument("data", help="photo folder, dataset file or BSON dump")
    p.add_argument("--out", required=True, help="parquet file to write")
    p.add_argument("--top-k", type=int, help="labels kept per class task (default 5)")
    p.add_argument("--part-rows", type=int, default=8192, help="rows per resumable part")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the embedding cache")
    add_config_options(p)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a local Ray; 'auto' or an address joins a cluster (docs/scale.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.artifact import CatalensModel
    from catalens.commands._common import config_from_args
    from catalens.ingest.sources import open_catalogue
    from catalens.predict.predictor import predict_catalogue
    from catalens.train.features import engine_config

    if args.top_k:
        args.set.append(f"top_k={args.top_k}")
    cfg = config_from_args(args)
    model = CatalensModel.load(args.model)
    cat = open_catalogue(args.data)
    if getattr(args, "ray", None):  # the same pipeline on a Ray cluster
        from catalens.scale import RayOptions, ray_predict_catalogue

        res = ray_predict_catalogue(args.model, cat, args.out, cfg, RayOptions(address=args.ray),
                                    use_cache=not args.no_cache, model=model)
    else:
        res = predict_catalogue(model, cat, args.out, cfg, engine_config(cfg), part_rows=args.part_rows,
                                use_cache=not args.no_cache)
    print(f"{res.rows} rows ({res.problems} with problems) written to {res.path} in {res.seconds:.1f}s "
          f"({res.rows / max(res.seconds, 1e-9):.1f} img/s)")
    return 0

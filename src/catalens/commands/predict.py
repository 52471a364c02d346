"""catalens predict MODEL SOURCE... [--out FILE]

Arguments are checked before anything heavy is imported (a wrong path answers at once). Exit
codes: 0 every photo predicted; 1 some photos could not be used (their rows are still written,
with ``problem`` set); 2 a usage or data error.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

logger = logging.getLogger("catalens.predict")

#: photos predicted and printed when there is no --out
DEFAULT_SHOW = 20


def register(sub) -> None:
    from catalens.commands._common import add_config_options, positive_int

    p = sub.add_parser(
        "predict", help="predict photos: files, folders, globs, lists, tables, dataset files, BSON dumps",
        description="Ask MODEL about photos. SOURCE is any of: image files; quoted globs ('new/**/*.jpg'); "
                    "folders (recursive, any layout; a labelled class-folder layout keeps its labels as "
                    "true_<task>); a .txt list of paths; a .csv/.parquet table with a path column "
                    "(path, image, file, filepath, or --path-column) and optionally a title column; a dataset "
                    ".yaml; a .bson dump. Without --out a table is printed; with --out every photo is written "
                    "(.parquet streaming and resumable, .csv, .jsonl). Columns per class task: TASK, TASK_prob, "
                    "TASK_top_labels, TASK_top_probs; per tags task: TASK_tags and TASK_TAG_prob / TASK_TAG. "
                    "Photos that cannot be used keep their row with 'problem' set. Exit codes: 0 all predicted, "
                    "1 some photos failed, 2 usage or data error.")
    p.add_argument("model", help="model folder (catalens train --out)")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="photos to predict (see above)")
    p.add_argument("--out", help="write every row to this file: .parquet, .csv or .jsonl")
    p.add_argument("--top-k", type=positive_int, help="labels kept per class task (default 5)")
    p.add_argument("--path-column", metavar="COLUMN", help="the path column of a .csv/.parquet table")
    p.add_argument("--title-column", metavar="COLUMN",
                   help="the product-title column of a table (for a model trained with --text)")
    p.add_argument("--show", type=positive_int, default=DEFAULT_SHOW, metavar="N",
                   help=f"without --out: photos predicted and printed (default {DEFAULT_SHOW})")
    p.add_argument("--explain", metavar="DIR",
                   help="also write DIR/<id>.png per photo: a Grad-CAM heatmap of the first class task's label "
                        "over the photo (CNN backbones; see docs/decisions.md)")
    p.add_argument("--part-rows", type=positive_int, default=8192, help="rows per resumable part (with --out)")
    p.add_argument("--no-cache", action="store_true", help="do not read/write the embedding cache")
    add_config_options(p)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a local Ray; 'auto' or an address joins a cluster (docs/scale.md)")
    p.set_defaults(func=run)


def check_arguments(args) -> None:
    """Everything that can be checked without torch: the model folder, the sources, --out."""
    from catalens.model.format import read_description
    from catalens.paths import check_output
    from catalens.predict.writers import output_format

    read_description(args.model)
    for s in args.sources:
        if not Path(s).expanduser().exists() and not (set("*?[") & set(s)):
            raise FileNotFoundError(f"SOURCE '{s}' does not exist; give image files, folders, quoted globs, "
                                    f"a .txt list, a .csv/.parquet table, a dataset .yaml or a .bson dump")
    if args.out:
        output_format(args.out)
        check_output(args.out, [args.model] + list(args.sources), flag="--out")
    if args.ray and not args.out:
        raise ValueError("--ray writes a file: add --out FILE (.parquet, .csv or .jsonl)")


def run(args) -> int:
    check_arguments(args)
    from catalens.commands._common import config_from_args
    from catalens.ingest.inputs import open_inputs

    if args.top_k:
        args.set.append(f"top_k={args.top_k}")
    cfg = config_from_args(args)
    cat = open_inputs(args.sources, args.path_column, args.title_column)
    if len(cat) == 0:
        raise ValueError(f"{', '.join(args.sources)}: no photo to predict")
    if args.explain:
        _explain(args, cat)
    if args.out is None:
        return _print_table(cat, cfg, args)
    from catalens.model.load import load_model

    model = load_model(args.model, lazy=not getattr(args, "ray", None))  # network built only if the runtime needs it
    if getattr(args, "ray", None):  # the same pipeline on a Ray cluster
        from catalens.scale import RayOptions, ray_predict_catalogue

        res = ray_predict_catalogue(args.model, cat, args.out, cfg, RayOptions(address=args.ray),
                                    use_cache=not args.no_cache, model=model)
    else:
        from catalens.predict.predictor import predict_catalogue

        res = predict_catalogue(model, cat, args.out, cfg, part_rows=args.part_rows, use_cache=not args.no_cache)
    logger.info(f"{res.rows} rows ({res.problems} with problems) written to {res.path} in {res.seconds:.1f}s "
                f"({res.rows / max(res.seconds, 1e-9):.1f} img/s)")
    return 1 if res.problems else 0


def _explain(args, cat) -> None:
    from catalens.model.explain import explain_catalogue
    from catalens.model.load import load_model

    written = explain_catalogue(load_model(args.model), cat, args.explain)
    logger.info(f"{len(written)} Grad-CAM heatmaps written to {args.explain}")


#: runtimes for which the printed table is answered through the ONNX graph (no torch import)
GRAPH_RUNTIMES = ("auto", "onnx")


def _answering_model(folder: str, cfg):
    """A few photos: the exported graph (torch-free, exported once into the runtime cache) when
    the runtime allows it; otherwise the model itself, on the runtime asked for."""
    if cfg.engine.runtime in GRAPH_RUNTIMES:
        from catalens.export.graph import GraphModel, ensure_graph

        return GraphModel(folder, ensure_graph(folder), threads=cfg.engine.threads)
    from catalens.model.load import load_model

    return load_model(folder)


def _print_table(cat, cfg, args) -> int:
    from catalens.model.predictor import Predictor
    from catalens.predict.table import format_predictions

    model = _answering_model(args.model, cfg)
    shown = cat.subset(slice(0, args.show)) if len(cat) > args.show else cat
    df = Predictor(model, args.model, cfg).predict(shown, use_cache=not args.no_cache, progress=False)
    sys.stdout.write(format_predictions(df, model.tasks, args.top_k or 1))
    if len(cat) > len(shown):
        sys.stdout.write(f"\nshowing the first {len(shown)} of {len(cat):,} photos; write them all with "
                         f"--out predictions.parquet (or .csv / .jsonl), or show more with --show N\n")
    return 1 if df["problem"].notna().any() else 0

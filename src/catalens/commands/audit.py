"""catalens audit DATA [--report DIR] [--near 0.95]"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options, unit_float

    p = sub.add_parser("audit", help="find duplicate photos, leakage across splits and conflicting labels",
                       description="Audit DATA: exact duplicates (same bytes), near duplicates (embedding "
                                   "cosine >= --near among distinct images), groups spanning train/val/test "
                                   "(leakage) and groups whose labels disagree. With --report, writes "
                                   "audit.json, groups.csv, leakage.csv, conflicts.csv, problems.csv and "
                                   "audit.html (thumbnails inline, works offline).")
    p.add_argument("data", help="photo folder, dataset file or BSON dump")
    p.add_argument("--report", metavar="DIR", help="report folder to write")
    p.add_argument("--near", type=unit_float, default=0.95, metavar="COSINE",
                   help="near-duplicate threshold on embedding cosine (default 0.95: also joins colourways of one "
                        "photo shoot; 0.98: only re-cropped / re-encoded copies; 0: exact duplicates only, no "
                        "embedding)")
    p.add_argument("--backbone", help="backbone for near duplicates (default efficientnet_lite0)")
    p.add_argument("--labels", action="store_true",
                   help="also rank likely wrong class labels (out-of-fold predictions on cached embeddings, "
                        "confident learning): REPORT/label_issues.csv and thumbnails in audit.html")
    p.add_argument("--label-folds", type=int, default=5, metavar="K", help="folds for --labels (default 5)")
    p.add_argument("--fail-on-leakage", action="store_true", help="exit with status 1 when any group spans splits")
    add_config_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.audit import run_audit
    from catalens.commands._common import config_from_args
    from catalens.paths import check_output

    if args.report:
        check_output(args.report, [args.data], flag="--report")
    cfg = config_from_args(args)
    if args.labels and not args.report:
        raise ValueError("--labels writes REPORT/label_issues.csv and thumbnails: give --report DIR too")
    if args.label_folds < 2:
        raise ValueError(f"--label-folds needs at least 2 folds; got {args.label_folds}")
    res = run_audit(args.data, args.report, cfg, near=args.near or None, labels=args.labels, folds=args.label_folds)
    return 1 if args.fail_on_leakage and res.leakage else 0

"""catalens embed DATA --out DIR"""
from __future__ import annotations


def register(sub) -> None:
    from catalens.commands._common import add_config_options

    p = sub.add_parser("embed", help="compute (and cache) backbone features of every image",
                       description="Embed DATA with a backbone. Writes DIR/embeddings.npy (float32, one row per "
                                   "image, zeros where the image failed), DIR/index.parquet (id, path, split, ok, "
                                   "problem) and DIR/backbone.json. Features are cached per image content.")
    p.add_argument("data", help="photo folder, dataset file or BSON dump")
    p.add_argument("--out", required=True, help="folder to write")
    add_config_options(p, backbone=True)
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray: alone, a local Ray; 'auto' or an address joins a cluster (docs/scale.md)")
    p.set_defaults(func=run)


def run(args) -> int:
    from catalens.commands._common import config_from_args
    from catalens.embed.export_features import embed_to_folder
    from catalens.paths import check_output

    check_output(args.out, [args.data])
    if getattr(args, "ray", None):  # the same pipeline on a Ray cluster
        from catalens.scale import RayOptions, ray_embed_to_folder

        ray_embed_to_folder(args.data, args.out, config_from_args(args), RayOptions(address=args.ray))
        return 0
    embed_to_folder(args.data, args.out, config_from_args(args))
    return 0

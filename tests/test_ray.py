"""``--ray``: the embed / predict pipeline on a local Ray cluster gives the single-process results."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from catalens.model.single import CatalensModel  # noqa: E402
from catalens.cli import main  # noqa: E402
from catalens.config import load_config  # noqa: E402
from catalens.embed.export_features import embed_to_folder  # noqa: E402
from catalens.ingest.open import open_catalogue  # noqa: E402
from catalens.model.predictor import output_schema, true_label_tasks  # noqa: E402
from catalens.predict.predictor import predict_catalogue  # noqa: E402
from catalens.scale import RayOptions, plan_cluster, ray_embed_to_folder, ray_predict_catalogue  # noqa: E402
from catalens.scale.ray_runner import merge_sorted_parts  # noqa: E402
from catalens.synthetic import make_catalogue  # noqa: E402
from catalens.embed.features import engine_config  # noqa: E402
from catalens.train.pipeline import train  # noqa: E402

CFG = [{"engine": {"progress": False, "runtime": "eager"}, "head": {"epochs": 30}, "tracking": False}]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    data = make_catalogue(root / "data", n_products=120, size=128, bad_files=True)
    cfg = load_config(None, CFG)
    train(data, root / "model", cfg, **QUIET)
    return root, data, cfg


@pytest.fixture(scope="module")
def local_ray():
    """A local 2-CPU Ray cluster for this module (shut down after)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def test_plan_matches_single_process_split():
    p = plan_cluster(RayOptions(), nodes=[2.0])
    assert (p.actors, p.threads, p.actor_cpus, p.decode_cpus) == (1, 2, 1.5, 0.5)
    p = plan_cluster(RayOptions(), nodes=[16.0, 16.0, 32.0])   # the smallest node sizes the plan
    assert (p.actors, p.actor_cpus, p.threads, p.decode_cpus) == (6, 6.0, 8, 1.0)
    assert plan_cluster(RayOptions(actors=3, threads=4), nodes=[8.0]).actors == 3


def _assert_same_predictions(a: pd.DataFrame, b: pd.DataFrame, model: CatalensModel) -> None:
    assert list(a.columns) == list(b.columns)
    assert a["id"].tolist() == b["id"].tolist()
    for col in ("product_id", "path", "split", "problem"):
        assert a[col].tolist() == b[col].tolist(), col
    for t in model.tasks:
        if t.kind == "class":
            assert a[t.name].tolist() == b[t.name].tolist()
            ok = a[t.name].notna()
            np.testing.assert_allclose(a.loc[ok, f"{t.name}_prob"], b.loc[ok, f"{t.name}_prob"], atol=1e-5)
            pa_, pb = np.stack(a.loc[ok, f"{t.name}_top_probs"]), np.stack(b.loc[ok, f"{t.name}_top_probs"])
            np.testing.assert_allclose(pa_, pb, atol=1e-5)
        else:
            assert [None if v is None else list(v) for v in a[f"{t.name}_tags"]] == \
                   [None if v is None else list(v) for v in b[f"{t.name}_tags"]]
            for tag in t.classes:
                c = f"{t.name}_{tag}_prob"
                np.testing.assert_allclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=1e-5)


def test_predict_on_ray_equals_single_process(trained, local_ray, tmp_path):
    root, data, cfg = trained
    model = CatalensModel.load(root / "model")
    cat = open_catalogue(data)
    single = predict_catalogue(model, cat, tmp_path / "single.parquet", cfg, engine_config(cfg),
                               part_rows=50, use_cache=False, **QUIET)
    on_ray = ray_predict_catalogue(root / "model", cat, tmp_path / "ray.parquet", cfg,
                                   RayOptions(block_rows=24), **QUIET)
    assert single.rows == on_ray.rows == len(cat) == 128 and single.problems == on_ray.problems == 4
    schema = output_schema(model.tasks, true_label_tasks(model.tasks, cat))   # labels kept as true_<task>
    assert "true_category" in schema.names
    assert pq.read_schema(tmp_path / "ray.parquet").equals(schema)
    assert pq.ParquetFile(tmp_path / "ray.parquet").metadata.num_rows == 128
    a, b = pd.read_parquet(tmp_path / "single.parquet"), pd.read_parquet(tmp_path / "ray.parquet")
    _assert_same_predictions(a, b, model)
    bad = json.loads((data.parent / "bad_files.json").read_text())
    problems = dict(zip(b["id"], b["problem"]))
    assert problems[bad["missing"]].startswith("missing:") and problems[bad["truncated"]].startswith("truncated:")
    assert problems[bad["not_an_image"]].startswith("not_an_image:") and pd.isna(problems[bad["cmyk"]])
    assert not list(tmp_path.glob("*.ray-parts*")) and not list(tmp_path.glob("*.tmp*"))


def test_predict_command_with_ray_flag(trained, local_ray, tmp_path, capsys):
    root, data, cfg = trained
    args = ["predict", str(root / "model"), str(data), "--no-progress", "--runtime", "eager"]
    # exit 1: the 4 deliberately broken photos could not be used (their rows are written)
    assert main(args + ["--out", str(tmp_path / "single.parquet"), "--no-cache"]) == 1
    assert main(args + ["--out", str(tmp_path / "ray.parquet"), "--ray"]) == 1  # joins the running Ray
    assert "128 rows (4 with problems)" in capsys.readouterr().err
    assert ray.is_initialized()
    _assert_same_predictions(pd.read_parquet(tmp_path / "single.parquet"), pd.read_parquet(tmp_path / "ray.parquet"),
                             CatalensModel.load(root / "model"))


def test_embed_on_ray_equals_single_process(trained, local_ray, tmp_path):
    _, data, cfg = trained
    embed_to_folder(data, tmp_path / "single", cfg, **QUIET)
    ray_embed_to_folder(data, tmp_path / "ray", cfg, RayOptions(block_rows=40), use_cache=False, **QUIET)
    a, b = np.load(tmp_path / "single" / "embeddings.npy"), np.load(tmp_path / "ray" / "embeddings.npy")
    assert a.shape == b.shape == (128, 1280)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    ia, ib = pd.read_parquet(tmp_path / "single" / "index.parquet"), pd.read_parquet(tmp_path / "ray" / "index.parquet")
    pd.testing.assert_frame_equal(ia, ib)
    assert int((~ib["ok"]).sum()) == 4 and not b[~ib["ok"].to_numpy()].any()


def test_merge_sorts_out_of_order_parts(tmp_path):
    schema = pa.schema([("id", pa.string()), ("x", pa.float32())])
    parts = tmp_path / "parts"
    parts.mkdir()
    for name, rows in (("part-000000000000", [0, 1, 5]), ("part-000000000002", [2, 3, 4])):  # overlapping ranges
        pq.write_table(pa.table({"id": [f"i{r}" for r in rows], "x": np.array(rows, np.float32), "row": rows}),
                       parts / f"{name}.parquet")
    merge_sorted_parts(parts, tmp_path / "out.parquet", schema, 6)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.equals(schema) and out.column("id").to_pylist() == [f"i{r}" for r in range(6)]
    with pytest.raises(RuntimeError, match="returned 6 rows"):
        merge_sorted_parts(parts, tmp_path / "out2.parquet", schema, 7)


def test_predict_on_ray_keeps_titles_hierarchy_decoding_and_products(local_ray, tmp_path):
    """A model with a title model and hierarchy decoding, on products with several photos: the
    Ray run ships the whole folder (text/ included) and writes what the single process writes."""
    data = make_catalogue(tmp_path / "data", n_products=40, photos_per_product=2, size=96)
    cfg = load_config(None, CFG + [{"text": {"enabled": True}, "hierarchy_decoding": True}])
    train(data, tmp_path / "model", cfg, **QUIET)
    model = CatalensModel.load(tmp_path / "model")
    assert model.text is not None and model.meta["hierarchy_decoding"]
    cat = open_catalogue(data)
    cat.frame.loc[cat.frame.index[::3], "text"] = None          # some rows without a title: image only
    single = predict_catalogue(model, cat, tmp_path / "single.parquet", cfg, engine=engine_config(cfg),
                               use_cache=False, **QUIET)
    on_ray = ray_predict_catalogue(tmp_path / "model", cat, tmp_path / "ray.parquet", cfg,
                                   RayOptions(block_rows=24, shutdown=False), use_cache=False, **QUIET)
    _assert_same_predictions(pd.read_parquet(tmp_path / "single.parquet"), pd.read_parquet(tmp_path / "ray.parquet"),
                             model)
    assert single.products is not None and on_ray.products == tmp_path / "ray.products.parquet"
    a, b = pd.read_parquet(single.products), pd.read_parquet(on_ray.products)
    assert len(a) == len(b) == 40 and a["product_id"].tolist() == b["product_id"].tolist()
    for t in model.tasks:
        if t.kind == "class":
            assert a[t.name].tolist() == b[t.name].tolist()

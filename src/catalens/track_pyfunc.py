"""Log a model to MLflow as a pyfunc, so ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` work.

``log_pyfunc(MODEL)`` logs the exported ONNX graph (exported first when missing) and its
``onnx.json`` as artifacts, with :class:`CatalensPyfunc` as the python model and the catalens
package itself as code (so the served model needs only onnxruntime, numpy, pillow and pandas).

Input: a DataFrame with a column ``image`` holding encoded photos, as ``bytes`` or base64
strings (what ``mlflow models serve`` receives as JSON). Output: a DataFrame, one row per image:
per class task ``TASK`` (top label) and ``TASK_prob``; per tags task ``TASK_tags`` (the tags
over their thresholds, comma separated) and ``TASK_TAG_prob`` per tag; ``problem`` is empty or
says why a photo could not be read (one bad photo does not fail the others).
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow.pyfunc

IMAGE_COLUMN = "image"


def _to_bytes(v) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        s = v.split(",", 1)[1] if v.startswith("data:") and "," in v[:200] else v
        try:
            return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not valid base64 ({e})") from None
    raise ValueError(f"expected bytes or a base64 string, got {type(v).__name__}")


class CatalensPyfunc(mlflow.pyfunc.PythonModel):
    """Encoded photos → top labels, probabilities and tags, with ONNX Runtime."""

    def load_context(self, context) -> None:
        import json

        from catalens.export.onnx import OnnxModel
        from catalens.model.decode import Decoder

        self.model = OnnxModel(context.artifacts["onnx"])
        path = context.artifacts.get("model_json")
        desc = json.loads(Path(path).read_text()) if path else None
        # the model folder's decoder (hierarchy decoding, thresholds); a graph logged without
        # model.json decodes with the tasks the graph carries
        self.decoder = Decoder.from_description(desc) if desc else Decoder(self.model.tasks,
                                                                             self.model.description.get("hierarchy_paths") or {})

    def predict(self, context, model_input, params=None):
        import numpy as np
        import pandas as pd

        from catalens.ingest.images import ImageProblem, load_rgb

        if isinstance(model_input, pd.DataFrame):
            col = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
            values = list(model_input[col])
        else:
            values = list(model_input)
        m, dec = self.model, self.decoder
        pixels, problems = [], []
        for v in values:
            try:
                pixels.append(load_rgb(_to_bytes(v), m.preprocess))
                problems.append("")
            except (ImageProblem, ValueError) as e:
                pixels.append(None)
                problems.append(str(e))
        ok = np.array([p is not None for p in pixels], dtype=bool)
        probs = {t.name: np.zeros((len(values), t.n_outputs), np.float32) for t in dec.tasks}
        if ok.any():
            for k, v in m.run_hwc(np.stack([p for p in pixels if p is not None])).items():
                probs[k][ok] = v
        cols = dec.columns(dec.decode(probs, top_k=1), ok)
        out = pd.DataFrame({"problem": problems})
        for t in dec.tasks:
            if t.kind == "class":
                out[t.name] = cols[t.name]
                out[f"{t.name}_prob"] = [float("nan") if v is None else v for v in cols[f"{t.name}_prob"]]
            else:
                out[f"{t.name}_tags"] = [None if v is None else ",".join(v) for v in cols[f"{t.name}_tags"]]
                for c in t.classes:
                    out[f"{t.name}_{c}_prob"] = [float("nan") if v is None else v for v in cols[f"{t.name}_{c}_prob"]]
        return out


def log_pyfunc(model_dir: str | Path, artifact_path: str = "model", *, onnx_path: str | Path | None = None,
               registered_model_name: str | None = None, input_example: bool = True):
    """Log ``MODEL`` as an MLflow pyfunc in the active run (one is started if none is active).

    Returns MLflow's ``ModelInfo`` (``.model_uri`` loads it back with ``mlflow.pyfunc.load_model``).
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    import catalens
    from catalens.export.onnx import ensure_onnx, read_description, sidecar_path

    model_dir = Path(model_dir)
    onnx_file = Path(onnx_path) if onnx_path else ensure_onnx(model_dir)
    desc = read_description(onnx_file)
    artifacts = {"onnx": str(onnx_file), "model_json": str(model_dir / "model.json")}
    if sidecar_path(onnx_file).exists():
        artifacts["onnx_json"] = str(sidecar_path(onnx_file))
    out_cols = [ColSpec("string", "problem")]
    for t in desc["tasks"]:
        if t["kind"] == "class":
            out_cols += [ColSpec("string", t["name"]), ColSpec("double", f"{t['name']}_prob")]
        else:
            out_cols.append(ColSpec("string", f"{t['name']}_tags"))
            out_cols += [ColSpec("double", f"{t['name']}_{c}_prob") for c in t["classes"]]
    signature = ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=Schema(out_cols))
    kwargs = {}
    if input_example:
        import pandas as pd

        from catalens.ingest.images import Preprocess

        kwargs["input_example"] = pd.DataFrame({IMAGE_COLUMN: [_example_b64(Preprocess.from_dict(desc["preprocess"]))]})
    active = mlflow.active_run()
    run = active or mlflow.start_run(run_name=f"catalens-{model_dir.resolve().name}")
    try:
        mlflow.log_dict(desc, "catalens_model.json")
        return mlflow.pyfunc.log_model(
            name=artifact_path, python_model=CatalensPyfunc(), artifacts=artifacts, signature=signature,
            code_paths=[str(Path(catalens.__file__).parent)], registered_model_name=registered_model_name,
            pip_requirements=["onnxruntime", "numpy", "pillow", "pandas", "mlflow"], **kwargs)
    finally:
        if active is None:
            mlflow.end_run()


def _example_b64(pre) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", pre.hw[::-1], (200, 60, 60)).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()

"""Turn task probabilities into table columns (top-k labels, tag decisions)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from catalens.tasks import TaskInfo


def output_schema(tasks: list[TaskInfo], extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """The parquet schema of predictions (fixed up front so every shard matches)."""
    fields = [pa.field("id", pa.string()), pa.field("product_id", pa.string()), pa.field("path", pa.string()),
              pa.field("split", pa.string()), pa.field("problem", pa.string())]
    for t in tasks:
        if t.kind == "class":
            fields += [pa.field(t.name, pa.string()), pa.field(f"{t.name}_prob", pa.float32()),
                       pa.field(f"{t.name}_top_labels", pa.list_(pa.string())),
                       pa.field(f"{t.name}_top_probs", pa.list_(pa.float32()))]
        else:
            fields.append(pa.field(f"{t.name}_tags", pa.list_(pa.string())))
            for tag in t.classes:
                fields += [pa.field(f"{t.name}_{tag}_prob", pa.float32()), pa.field(f"{t.name}_{tag}", pa.bool_())]
    for k, v in (extra or {}).items():
        fields.append(pa.field(k, v))
    return pa.schema(fields)


def prediction_columns(tasks: list[TaskInfo], probs: dict[str, np.ndarray], ok: np.ndarray,
                       top_k: int) -> dict[str, list]:
    """Columns for ``n`` rows; rows with ``ok == False`` get nulls."""
    n = len(ok)
    cols: dict[str, list] = {}
    for t in tasks:
        p = probs[t.name]
        if t.kind == "class":
            k = min(top_k, t.n_outputs)
            top = np.argsort(-p, axis=1, kind="stable")[:, :k]                  # (n, k)
            top_p = np.take_along_axis(p, top, 1)
            names = np.asarray(t.classes, dtype=object)
            cols[t.name] = [names[top[i, 0]] if ok[i] else None for i in range(n)]
            cols[f"{t.name}_prob"] = [float(top_p[i, 0]) if ok[i] else None for i in range(n)]
            cols[f"{t.name}_top_labels"] = [list(names[top[i]]) if ok[i] else None for i in range(n)]
            cols[f"{t.name}_top_probs"] = [top_p[i].astype(float).tolist() if ok[i] else None for i in range(n)]
        else:
            thr = t.threshold_array()
            dec = p >= thr[None, :]
            cols[f"{t.name}_tags"] = [[c for c, d in zip(t.classes, dec[i]) if d] if ok[i] else None
                                      for i in range(n)]
            for j, tag in enumerate(t.classes):
                cols[f"{t.name}_{tag}_prob"] = [float(p[i, j]) if ok[i] else None for i in range(n)]
                cols[f"{t.name}_{tag}"] = [bool(dec[i, j]) if ok[i] else None for i in range(n)]
    return cols

"""The one place where probabilities become answers.

Every consumer of a model — ``catalens predict`` (parquet / CSV / JSONL), ``catalens.load().predict``,
evaluate, the server's three protocols and its web page, Ray, the MLflow pyfunc — turns
probabilities into labels here and nowhere else:

1. **fusion**: a model trained with ``--text`` fuses each row's title with the image
   probabilities (:meth:`Decoder.fuse`; rows without a title keep the image's);
2. **hierarchy decoding**: with ``hierarchy_decoding`` in model.json the label of every level of a
   ``master > sub > article`` chain is the most probable path seen in training
   (:mod:`catalens.heads.hierarchy`); without it each level takes its own argmax;
3. **top-k**: labels ranked by probability (stable order on ties);
4. **tag thresholds**: a tag is present when its probability reaches the tuned threshold;
5. **auto-accept**: ``<task>_accept`` is true when the probability of the decided label reaches
   the task's accept threshold (model.json ``accept``, chosen for a target precision:
   :mod:`catalens.evaluate.selective`); null for a model without one;
6. **unknown products**: ``unknown_score`` (model.json ``unknown``: :mod:`catalens.model.unknown`)
   and ``unknown`` (the score exceeds the threshold keeping 95% of validation photos);
7. **title–image conflicts** (a model with a title model): per class task the image-only and the
   title-only answers are compared (:mod:`catalens.text.conflict`, threshold in ``text/fusion.json``):
   ``<task>_conflict`` (they disagree strongly), ``conflict`` (some class task does) and
   ``conflict_winner`` (``"image"`` or ``"title"``: the side whose answer the decided label
   follows, for the task with the strongest conflict; null without a conflict). A photo without
   a title has ``conflict`` False; every conflict column is null for a model without a title
   model (and for ensembles, whose members fuse titles each on their own). :meth:`Decoder.fuse`
   returns :class:`FusedProbs`, which carries the image-only and title-only probabilities to
   :meth:`Decoder.decode`.

:meth:`Decoder.decode` returns :class:`Answers` (index arrays, no strings); :meth:`Decoder.columns`
turns them into the output columns (one row shape for every output), :meth:`Decoder.record` into
the server's JSON for one image. numpy only: no torch on this path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catalens.tasks import TaskInfo, hierarchy_levels

#: columns every prediction row starts with (then the task columns, see :func:`column_names`)
BASE_COLUMNS = ("id", "product_id", "path", "split", "problem")
#: per-photo flags that close every prediction row (null for a model without them)
FLAG_COLUMNS = ("unknown_score", "unknown", "conflict", "conflict_winner")


class FusedProbs(dict):
    """Fused probabilities ``{task: (n, C)}`` (a dict like any other) that also carry what was
    fused: ``image`` (the image-only probabilities) and ``title`` (the title-only ones, NaN rows
    where a row has no title), so that :meth:`Decoder.decode` can flag title–image conflicts."""

    def __init__(self, fused: dict, image: dict, title: dict) -> None:
        super().__init__(fused)
        self.image, self.title = image, title


@dataclass
class Answers:
    """Decoded answers for ``n`` rows (indices into each task's class order)."""

    probs: dict[str, np.ndarray]                 # task -> (n, C) float32, after fusion
    label: dict[str, np.ndarray]                 # class task -> (n,) chosen class (hierarchy-decoded)
    top: dict[str, np.ndarray]                   # class task -> (n, k) classes ranked by probability
    present: dict[str, np.ndarray]               # tags task -> (n, T) bool
    best_path: dict[str, np.ndarray] = field(default_factory=dict)  # class task in a chain -> (n,)
    accept: dict[str, np.ndarray] = field(default_factory=dict)     # class task with a threshold -> (n,) bool
    unknown_score: np.ndarray | None = None                         # (n,) float, None without model.json unknown
    unknown: np.ndarray | None = None                               # (n,) bool
    conflict: np.ndarray | None = None                              # (n,) bool, None without a title model
    conflict_task: dict = field(default_factory=dict)               # class task -> (n,) bool
    conflict_winner: np.ndarray | None = None                       # (n,) "image" / "title" / None

    def __len__(self) -> int:
        return len(next(iter(self.probs.values()))) if self.probs else 0

    def label_prob(self, task: str) -> np.ndarray:
        """``(n,)`` probability of the chosen label of ``task``."""
        p = self.probs[task]
        return p[np.arange(len(p)), self.label[task]]


@dataclass
class Decoder:
    """Probabilities (+ titles) → answers for a model's tasks.

    ``hierarchy_paths``: the paths seen in training (model.json); ``hierarchy_decoding``: labels
    follow the best known path; ``text``: the title fusion (:class:`catalens.text.fusion.TextFusion`)
    of a model trained with ``--text``, or None.
    """

    tasks: list[TaskInfo]
    hierarchy_paths: dict = field(default_factory=dict)
    hierarchy_decoding: bool = False
    text: object = None
    accept: dict = field(default_factory=dict)   # class task -> accept threshold (None: accept nothing)
    unknown: dict | None = None                  # {"method", "tasks", "threshold", "keep"}

    def __post_init__(self) -> None:
        self.chains = hierarchy_levels(self.tasks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_description(cls, desc, text=None) -> "Decoder":
        """From a :class:`~catalens.model.format.ModelDescription` (or model.json's dict)."""
        if isinstance(desc, dict):
            from catalens.model.format import parse_description

            desc = parse_description(desc)
        return cls(desc.task_infos(), dict(desc.hierarchy_paths), bool(desc.hierarchy_decoding), text,
                   dict(desc.accept.thresholds) if desc.accept else {},
                   desc.unknown.model_dump() if desc.unknown else None)

    @classmethod
    def from_meta(cls, tasks: list[TaskInfo], meta: dict, text=None) -> "Decoder":
        """From a loaded model's ``meta`` (model.json as a dict) and its tasks."""
        acc, unk = meta.get("accept") or {}, meta.get("unknown") or None
        return cls(tasks, dict(meta.get("hierarchy_paths") or {}), bool(meta.get("hierarchy_decoding")), text,
                   dict(acc.get("thresholds") or {}), dict(unk) if unk else None)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Decoder":
        """The decoder of a model folder, without loading any weights but the title model's."""
        from catalens.model.format import read_description

        return cls.from_description(read_description(folder), load_text(folder))

    # ------------------------------------------------------------------ steps
    def fuse(self, probs: dict[str, np.ndarray], titles=None) -> dict[str, np.ndarray]:
        """Image probabilities fused with ``titles`` (one per row, None = no title) when the model
        has a title model; otherwise ``probs`` unchanged."""
        if self.text is None or titles is None:
            return probs
        titles = np.asarray(list(titles), dtype=object)
        p_title = self.text.title_proba(titles)
        return FusedProbs(self.text.fuse(probs, titles, p_title), probs, p_title)

    def decode(self, probs: dict[str, np.ndarray], top_k: int = 5) -> Answers:
        """Labels, top-k and tag decisions of ``n`` rows of probabilities ``{task: (n, C)}``."""
        label, top, present = {}, {}, {}
        for t in self.tasks:
            p = np.asarray(probs[t.name])
            if t.kind == "class":
                k = max(1, min(int(top_k), t.n_outputs))
                top[t.name] = np.argsort(-p, axis=1, kind="stable")[:, :k]          # (n, k)
                label[t.name] = top[t.name][:, 0] if len(p) else np.zeros(0, np.int64)
            else:
                present[t.name] = p >= t.threshold_array()[None, :]                  # (n, T)
        best = self._best_paths(probs) if self.hierarchy_paths else {}
        if self.hierarchy_decoding:
            label.update(best)
        ans = Answers(probs, label, top, present, best)
        for name, thr in self.accept.items():
            if name in label:
                ans.accept[name] = accept_mask(ans.label_prob(name), thr)
        if self.unknown is not None:
            from catalens.model.unknown import unknown_score

            ans.unknown_score = unknown_score(probs, self.unknown["tasks"], self.unknown["method"])
            ans.unknown = ans.unknown_score > float(self.unknown["threshold"])
        if self.text is not None:
            self._conflicts(ans, probs)
        return ans

    def _conflicts(self, ans: Answers, probs: dict) -> None:
        """``ans.conflict*`` (see the module docstring); False everywhere when ``probs`` were not
        fused with titles (:class:`FusedProbs`)."""
        from catalens.text.conflict import conflict_scores

        n, cfg = len(ans), self.text.conflict
        best, winner = np.zeros(n), np.full(n, None, dtype=object)
        for t in self.tasks:
            if t.kind != "class":
                continue
            if not isinstance(probs, FusedProbs) or t.name not in probs.title:
                ans.conflict_task[t.name] = np.zeros(n, bool)
                continue
            p_img, p_txt = np.asarray(probs.image[t.name]), np.asarray(probs.title[t.name])
            score = conflict_scores(p_img, p_txt, cfg["method"])
            flag = score > float(cfg["threshold"])
            ans.conflict_task[t.name] = flag
            stronger = flag & (score > best)
            if stronger.any():
                side = _winner(ans.label[t.name], p_img, np.nan_to_num(p_txt))
                winner[stronger], best[stronger] = side[stronger], score[stronger]
        ans.conflict = np.any([v for v in ans.conflict_task.values()], axis=0) if ans.conflict_task \
            else np.zeros(n, bool)
        ans.conflict_winner = winner

    def _best_paths(self, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from catalens.heads.hierarchy import decode_hierarchy

        n = len(next(iter(probs.values())))
        if n == 0:
            return {}
        return decode_hierarchy(self.tasks, probs, self.hierarchy_paths)

    def __call__(self, probs: dict[str, np.ndarray], titles=None, top_k: int = 5) -> Answers:
        """Fuse, then decode."""
        return self.decode(self.fuse(probs, titles), top_k)

    # ------------------------------------------------------------------ outputs
    def columns(self, ans: Answers, ok: np.ndarray | None = None) -> dict[str, list]:
        """The prediction columns of every row (see :func:`column_names`); rows with
        ``ok == False`` (their photo failed) get nulls."""
        n = len(ans) if ok is None else len(ok)
        ok = np.ones(n, bool) if ok is None else np.asarray(ok, bool)
        cols: dict[str, list] = {}
        for t in self.tasks:
            names = np.asarray(t.classes, dtype=object)
            if t.kind == "class":
                p, top, lab = ans.probs[t.name], ans.top[t.name], ans.label[t.name]
                cols[t.name] = [names[lab[i]] if ok[i] else None for i in range(n)]
                cols[f"{t.name}_prob"] = [float(p[i, lab[i]]) if ok[i] else None for i in range(n)]
                acc = ans.accept.get(t.name)
                cols[f"{t.name}_accept"] = [bool(acc[i]) if ok[i] and acc is not None else None for i in range(n)]
                con = ans.conflict_task.get(t.name)
                cols[f"{t.name}_conflict"] = [bool(con[i]) if ok[i] and con is not None else None for i in range(n)]
                cols[f"{t.name}_top_labels"] = [list(names[top[i]]) if ok[i] else None for i in range(n)]
                cols[f"{t.name}_top_probs"] = [p[i, top[i]].astype(float).tolist() if ok[i] else None
                                               for i in range(n)]
            else:
                p, dec = ans.probs[t.name], ans.present[t.name]
                cols[f"{t.name}_tags"] = [list(names[dec[i]]) if ok[i] else None for i in range(n)]
                for j, tag in enumerate(t.classes):
                    cols[f"{t.name}_{tag}_prob"] = [float(p[i, j]) if ok[i] else None for i in range(n)]
                    cols[f"{t.name}_{tag}"] = [bool(dec[i, j]) if ok[i] else None for i in range(n)]
        has = ans.unknown_score is not None
        cols["unknown_score"] = [float(ans.unknown_score[i]) if has and ok[i] else None for i in range(n)]
        cols["unknown"] = [bool(ans.unknown[i]) if has and ok[i] else None for i in range(n)]
        con = ans.conflict is not None
        cols["conflict"] = [bool(ans.conflict[i]) if con and ok[i] else None for i in range(n)]
        cols["conflict_winner"] = [ans.conflict_winner[i] if con and ok[i] else None for i in range(n)]
        return cols

    def record(self, ans: Answers, i: int) -> dict:
        """The server's JSON for row ``i``: ``labels`` (the decided label per class task, as
        ``catalens predict`` writes it, with ``accept`` when the model has accept thresholds),
        ``classes`` (top-k ranked by probability), ``tags``, ``hierarchy`` (per chain: the path,
        whether it was seen in training, and the best seen path when it was not), and
        ``unknown_score`` / ``unknown`` (null for a model without them), ``conflict`` /
        ``conflict_winner`` (null for a model without a title model; each label also has
        ``conflict`` when the model has one)."""
        labels, classes, tags = {}, {}, {}
        for t in self.tasks:
            p = np.asarray(ans.probs[t.name][i], dtype=np.float64)
            if t.kind == "class":
                j = int(ans.label[t.name][i])
                labels[t.name] = {"label": t.classes[j], "prob": float(p[j])}
                if t.name in ans.accept:
                    labels[t.name]["accept"] = bool(ans.accept[t.name][i])
                if t.name in ans.conflict_task:
                    labels[t.name]["conflict"] = bool(ans.conflict_task[t.name][i])
                classes[t.name] = [{"label": t.classes[c], "prob": float(p[c])} for c in ans.top[t.name][i]]
            else:
                thr = t.threshold_array()
                tags[t.name] = [{"tag": c, "prob": float(p[j]), "threshold": float(thr[j]),
                                 "present": bool(ans.present[t.name][i, j])} for j, c in enumerate(t.classes)]
        has = ans.unknown_score is not None
        return {"labels": labels, "classes": classes, "tags": tags, "hierarchy": self._hierarchy(ans, i),
                "unknown_score": float(ans.unknown_score[i]) if has else None,
                "unknown": bool(ans.unknown[i]) if has else None,
                "conflict": bool(ans.conflict[i]) if ans.conflict is not None else None,
                "conflict_winner": ans.conflict_winner[i] if ans.conflict is not None else None}

    def _hierarchy(self, ans: Answers, i: int) -> list[dict]:
        by_name = {t.name: t for t in self.tasks}
        out = []
        for chain in self.chains:
            idx = [int(ans.label[c][i]) for c in chain]
            entry = {"levels": chain, "path": [by_name[c].classes[j] for c, j in zip(chain, idx)],
                     "probs": [float(ans.probs[c][i, j]) for c, j in zip(chain, idx)]}
            known = {tuple(p) for p in self.hierarchy_paths.get(" > ".join(chain), [])}
            if known:
                entry["known"] = tuple(entry["path"]) in known
                if not entry["known"] and all(c in ans.best_path for c in chain):
                    best = [int(ans.best_path[c][i]) for c in chain]
                    entry["best_known_path"] = {
                        "path": [by_name[c].classes[j] for c, j in zip(chain, best)],
                        "joint_prob": float(np.prod([ans.probs[c][i, j] for c, j in zip(chain, best)]))}
            out.append(entry)
        return out

    def decoded_index(self, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{class task in a hierarchy chain: (n,) decided class}``: what the metrics compare with
        the labels (``pred_index`` of :func:`catalens.evaluate.metrics.compute_metrics`); empty
        without hierarchy decoding (each task's argmax stands)."""
        if not self.hierarchy_decoding:
            return {}
        ans = self.decode(probs, top_k=1)
        return {c: ans.label[c] for chain in self.chains for c in chain if c in ans.best_path}

    def labels(self, ans: Answers) -> dict[str, list[str]]:
        """``{class task: [label per row]}`` (the decided labels)."""
        return {t.name: [t.classes[j] for j in ans.label[t.name]] for t in self.tasks if t.kind == "class"}


def _winner(decided: np.ndarray, p_image: np.ndarray, p_title: np.ndarray) -> np.ndarray:
    """``(n,)`` "image" / "title": the side whose own answer the decided label is (when it is
    neither's, e.g. after hierarchy decoding, the side giving it the higher probability)."""
    rows = np.arange(len(decided))
    img, txt = p_image.argmax(axis=1), p_title.argmax(axis=1)
    title = (decided == txt) | ((decided != img) & (p_title[rows, decided] > p_image[rows, decided]))
    return np.where(title, "title", "image").astype(object)


def accept_mask(confidence: np.ndarray, threshold: float | None) -> np.ndarray:
    """``(n,)`` bool: the rows whose decided-label probability reaches the accept ``threshold``
    (none when it is None: no threshold reached the target precision)."""
    confidence = np.asarray(confidence)
    if threshold is None:
        return np.zeros(confidence.shape[0], dtype=bool)
    return confidence >= np.float32(threshold)


def column_names(tasks: list[TaskInfo]) -> list[str]:
    """The task columns of a prediction row, in order (after :data:`BASE_COLUMNS`)."""
    out = []
    for t in tasks:
        if t.kind == "class":
            out += [t.name, f"{t.name}_prob", f"{t.name}_accept", f"{t.name}_conflict", f"{t.name}_top_labels",
                    f"{t.name}_top_probs"]
        else:
            out.append(f"{t.name}_tags")
            for tag in t.classes:
                out += [f"{t.name}_{tag}_prob", f"{t.name}_{tag}"]
    return out + list(FLAG_COLUMNS)


def arrow_schema(tasks: list[TaskInfo], extra: dict | None = None):
    """The pyarrow schema of prediction rows (fixed up front so every part matches): the base
    columns, ``extra`` (e.g. ``true_<task>`` columns), then the task columns."""
    import pyarrow as pa

    fields = [pa.field(c, pa.string()) for c in BASE_COLUMNS]
    fields += [pa.field(k, v) for k, v in (extra or {}).items()]
    for t in tasks:
        if t.kind == "class":
            fields += [pa.field(t.name, pa.string()), pa.field(f"{t.name}_prob", pa.float32()),
                       pa.field(f"{t.name}_accept", pa.bool_()), pa.field(f"{t.name}_conflict", pa.bool_()),
                       pa.field(f"{t.name}_top_labels", pa.list_(pa.string())),
                       pa.field(f"{t.name}_top_probs", pa.list_(pa.float32()))]
        else:
            fields.append(pa.field(f"{t.name}_tags", pa.list_(pa.string())))
            for tag in t.classes:
                fields += [pa.field(f"{t.name}_{tag}_prob", pa.float32()), pa.field(f"{t.name}_{tag}", pa.bool_())]
    fields += [pa.field("unknown_score", pa.float32()), pa.field("unknown", pa.bool_()),
               pa.field("conflict", pa.bool_()), pa.field("conflict_winner", pa.string())]
    return pa.schema(fields)


def load_text(folder: str | Path):
    """The title fusion of a model folder (``text/fusion.json``), or None."""
    from catalens.model.format import FUSION_FILE, TEXT_DIR

    path = Path(folder) / TEXT_DIR
    if not (path / FUSION_FILE).exists():
        return None
    from catalens.text.fusion import TextFusion

    return TextFusion.load(path)

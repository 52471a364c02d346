"""``catalens audit``: exact and near duplicates, train/val/test leakage, conflicting labels.

1. Every row's bytes are hashed (:func:`catalens.embed.cache.content_hash`); rows with the
   same hash form an **exact** group.
2. One representative per distinct content is embedded through the embedding cache
   (:func:`catalens.embed.features.catalogue_features`, so a catalogue already trained on
   costs no inference) and pairs with cosine >= ``near`` are joined into **near** groups
   (re-encoded, resized or lightly edited copies); a near group lists every row of the
   contents it joins, and holds at least two distinct contents. Measured with
   EfficientNet-Lite0 features (docs/scale.md): on fashion-products, pairs >= 0.98 are the
   same photo re-cropped or re-encoded (7 pairs), 0.95-0.98 adds other colourways of the
   same shoot (same model and pose, ~400 pairs); a 0.75x downscaled, re-encoded copy of a
   224 px photo scores 0.92-0.97, of a 400+ px photo 0.97-0.99. The default 0.95 favours
   finding copies (the HTML report makes false alarms quick to dismiss); 0.98 keeps
   only unmistakable ones.
3. A group whose rows lie in more than one split is **leakage** (the same picture is both
   trained on and tested on); a group whose rows carry different labels for a task is a
   **conflict** (class task: two labels; tags task: a tag both 0 and 1).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from catalens.audit.duplicates import (components, exact_groups, hash_rows, normalise_rows,
                                       similar_pairs)
from catalens.config import Config, load_config
from catalens.ingest.catalogue import Catalogue

_logger = logging.getLogger(__name__)

DEFAULT_NEAR = 0.95


@dataclass
class Group:
    """Rows that show the same picture (``exact``: same bytes; ``near``: cosine >= threshold)."""

    name: str                    # E00001 / N00001
    kind: str                    # exact | near
    rows: list[int]              # catalogue row positions
    splits: list[str]            # distinct splits of the rows (None left out), sorted
    conflicts: dict[str, list[str]] = field(default_factory=dict)   # task -> distinct labels
    min_similarity: float | None = None   # near: weakest edge that joined the group
    max_similarity: float | None = None

    @property
    def cross_split(self) -> bool:
        return len(self.splits) > 1

    def to_dict(self, cat: Catalogue) -> dict:
        f = cat.frame
        return {"group": self.name, "kind": self.kind, "size": len(self.rows),
                "ids": [str(v) for v in f["id"].iloc[self.rows]], "rows": [int(r) for r in self.rows],
                "splits": self.splits, "cross_split": self.cross_split, "conflicts": self.conflicts,
                "min_similarity": self.min_similarity, "max_similarity": self.max_similarity}


@dataclass
class AuditResult:
    cat: Catalogue
    keys: list[str | None]
    exact: list[Group]
    near: list[Group]
    problems: dict[int, str]
    similarity: dict[int, float]          # row -> best cosine to another member of its near group
    threshold: float | None
    seconds: float
    summary: dict = field(default_factory=dict)
    report_dir: Path | None = None
    label_issues: object = None           # pandas DataFrame of --labels (catalens.audit.labels), or None

    @property
    def groups(self) -> list[Group]:
        return self.exact + self.near

    @property
    def leakage(self) -> list[Group]:
        return [g for g in self.groups if g.cross_split]

    @property
    def conflicts(self) -> list[Group]:
        return [g for g in self.groups if g.conflicts]


def _splits(cat: Catalogue, rows: list[int]) -> list[str]:
    return sorted({s for s in cat.frame["split"].iloc[rows] if isinstance(s, str)})


def label_conflicts(cat: Catalogue, rows: list[int]) -> dict[str, list[str]]:
    """Per task, the distinct labels of ``rows`` when they disagree (missing labels ignored)."""
    f = cat.frame.iloc[rows]
    out: dict[str, list[str]] = {}
    for t in cat.tasks:
        if t.kind == "class":
            if t.name not in f:
                continue
            labels = sorted({str(v) for v in f[t.name] if isinstance(v, str)})
            if len(labels) > 1:
                out[t.name] = labels
        else:
            bad = []
            for tag in t.classes:
                col = f"{t.name}/{tag}"
                if col in f:
                    vals = {float(v) for v in f[col].to_numpy(dtype=float) if not np.isnan(v)}
                    if len(vals) > 1:
                        bad.append(tag)
            if bad:
                out[t.name] = [f"{tag}: 0 and 1" for tag in bad]
    return out


def _group(cat: Catalogue, name: str, kind: str, rows: list[int], sims=None) -> Group:
    rows = sorted(rows)
    g = Group(name, kind, rows, _splits(cat, rows), label_conflicts(cat, rows))
    if sims is not None and len(sims):
        g.min_similarity, g.max_similarity = float(np.min(sims)), float(np.max(sims))
    return g


def audit_catalogue(cat: Catalogue, cfg: Config | None = None, near: float | None = DEFAULT_NEAR,
                    block: int = 2048, log=None) -> AuditResult:
    """Audit ``cat``; ``near=None`` (or 0) skips the embedding step (exact duplicates only)."""
    log = log or _logger.info
    cfg = cfg or load_config()
    t0 = time.time()
    paths = cat.frame["path"].astype(str).tolist()
    hashed = hash_rows(paths, cat.reader)
    keys = hashed.keys
    exact_rows = exact_groups(keys)
    exact = [_group(cat, f"E{k + 1:05d}", "exact", rows) for k, rows in enumerate(exact_rows)]
    log(f"audit: {len(cat)} images, {len(set(k for k in keys if k))} distinct contents, "
        f"{len(exact)} exact-duplicate groups ({sum(len(g.rows) for g in exact)} images), "
        f"{len(hashed.problems)} unreadable")
    near_groups: list[Group] = []
    similarity: dict[int, float] = {}
    problems = dict(hashed.problems)
    if near:
        near_groups, similarity, decode_problems = _near_groups(cat, keys, cfg, float(near), block, log)
        problems.update(decode_problems)
    res = AuditResult(cat, keys, exact, near_groups, problems, similarity, float(near) if near else None,
                      time.time() - t0)
    res.summary = summarise(res)
    return res


def _near_groups(cat: Catalogue, keys: list[str | None], cfg: Config, threshold: float, block: int, log):
    from catalens.embed.factory import backbone_from_config
    from catalens.embed.features import catalogue_features

    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None and k not in first:
            first[k] = i
    reps = np.array(sorted(first.values()), dtype=np.int64)
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            members.setdefault(k, []).append(i)
    backbone = backbone_from_config(cfg.backbone)
    t = time.time()
    feats = catalogue_features(cat.subset(reps), backbone, cfg)
    problems = {int(reps[p["row"]]): f"{p['problem']}: {p['detail']}" for p in feats.problems}
    ok = np.flatnonzero(feats.ok)
    x = normalise_rows(feats.features[ok])
    i, j, s = similar_pairs(x, threshold, block=block)
    comps = components(len(x), i, j)
    log(f"audit: {len(x)} distinct images embedded with {backbone.name} and compared in "
        f"{time.time() - t:.1f}s; {len(i)} pairs with cosine >= {threshold}")
    best = np.full(len(x), -np.inf, dtype=np.float32)
    np.maximum.at(best, i, s)
    np.maximum.at(best, j, s)
    edge_comp = {}
    for c, comp in enumerate(comps):
        for v in comp:
            edge_comp[v] = c
    sims: dict[int, list[float]] = {}
    for a, sv in zip(i.tolist(), s.tolist()):
        sims.setdefault(edge_comp[a], []).append(sv)
    groups, similarity = [], {}
    for c, comp in enumerate(comps):
        rows = []
        for v in comp:
            rep = int(reps[ok[v]])
            rows += members[keys[rep]]
            for r in members[keys[rep]]:
                similarity[r] = float(best[v])
        groups.append(_group(cat, f"N{c + 1:05d}", "near", rows, sims.get(c)))
    return groups, similarity, problems


def summarise(res: AuditResult) -> dict:
    cat = res.cat
    cross = {}
    for g in res.leakage:
        key = "+".join(g.splits)
        cross[key] = cross.get(key, 0) + 1
    conflict_tasks: dict[str, int] = {}
    for g in res.conflicts:
        for task in g.conflicts:
            conflict_tasks[task] = conflict_tasks.get(task, 0) + 1
    return {
        "images": len(cat), "source": cat.source, "distinct_contents": len({k for k in res.keys if k}),
        "unreadable": len(res.problems),
        "exact_groups": len(res.exact), "exact_images": sum(len(g.rows) for g in res.exact),
        "exact_redundant": sum(len(g.rows) - 1 for g in res.exact),
        "near_threshold": res.threshold, "near_groups": len(res.near),
        "near_images": sum(len(g.rows) for g in res.near),
        "leakage_groups": len(res.leakage),
        "leakage_by_kind": {k: sum(g.kind == k for g in res.leakage) for k in ("exact", "near")},
        "leakage_by_splits": cross,
        "leaked_test_images": int(sum(sum(cat.frame["split"].iat[r] in ("test", "val") for r in g.rows)
                                      for g in res.leakage if "train" in g.splits)),
        "conflict_groups": len(res.conflicts),
        "conflicts_by_task": conflict_tasks, "seconds": round(res.seconds, 2),
    }

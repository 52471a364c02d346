"""Task descriptions shared by every stage: what is predicted and in which class order.

A *class* task has exactly one label per image (softmax head); a *tags* task has a set
of tags per image, several of which can hold at once (sigmoid head).

Label encoding used everywhere (ingest → heads → evaluate):
- class task: ``int64`` array ``(n,)`` of class indices into ``classes``; ``-1`` = missing.
- tags task:  ``float32`` array ``(n, n_tags)`` of 0/1; ``NaN`` = missing for that image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

TaskKind = Literal["class", "tags"]
MISSING = -1


@dataclass
class TaskInfo:
    """One task of a model: its kind, class (or tag) order, parent level and thresholds."""

    name: str
    kind: TaskKind
    classes: list[str]
    parent: str | None = None
    thresholds: list[float] | None = None  # tags only: one decision threshold per tag
    extra: dict = field(default_factory=dict)

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        return cls(**d)

    def threshold_array(self) -> np.ndarray:
        """Per-tag thresholds as an array (0.5 where none were tuned)."""
        if self.kind != "tags":
            raise ValueError(f"task '{self.name}' is a class task; thresholds apply to tags")
        t = self.thresholds or [0.5] * len(self.classes)
        return np.asarray(t, dtype=np.float32)


def hierarchy_levels(tasks: list[TaskInfo]) -> list[list[str]]:
    """Chains of class tasks linked by ``parent``, root first, e.g. [[master, sub, article]]."""
    by_name = {t.name: t for t in tasks if t.kind == "class"}
    for t in by_name.values():
        _check_parents(t.name, by_name)
    children = {t.parent for t in by_name.values() if t.parent}
    chains = []
    for leaf in (t for t in by_name.values() if t.name not in children and t.parent):
        chain = [leaf.name]
        while by_name[chain[0]].parent:   # no cycles: checked above
            chain.insert(0, by_name[chain[0]].parent)
        chains.append(chain)
    return chains


def _check_parents(name: str, by_name: dict[str, TaskInfo]) -> None:
    """Walk up from ``name``: every parent a class task, no task its own ancestor."""
    chain = [name]
    while by_name[chain[0]].parent:
        parent = by_name[chain[0]].parent
        if parent == chain[0]:
            raise ValueError(f"task '{parent}' names itself as its parent; remove 'parent' or name the "
                             f"level above it")
        if parent not in by_name:
            raise ValueError(f"task '{chain[0]}' names parent '{parent}', which is not a class task")
        if parent in chain:
            raise ValueError(f"task parents form a cycle: {' > '.join([parent] + chain[:chain.index(parent) + 1])}; "
                             f"a hierarchy runs from one root task down, so remove one 'parent'")
        chain.insert(0, parent)


def in_class_order(probs: np.ndarray, have: list[str], want: list[str]) -> np.ndarray:
    """Columns ``(n, len(have))`` of ``probs`` in class order ``have`` as ``(n, len(want))`` in order
    ``want``; a class of ``want`` not in ``have`` gets 0."""
    where = {c: j for j, c in enumerate(have)}
    out = np.zeros((len(probs), len(want)), np.float32)
    for i, c in enumerate(want):
        if c in where:
            out[:, i] = probs[:, where[c]]
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits ``(n, C)`` (float64 inside, stable)."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Element-wise logistic function (stable: tanh form)."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def probabilities(kind: str, logits: np.ndarray) -> np.ndarray:
    """A task's probabilities from its logits: softmax for a class task, sigmoid per tag (float32)."""
    return (softmax(logits) if kind == "class" else sigmoid(logits)).astype(np.float32)


def labelled_rows(tasks: list[TaskInfo], Y: dict[str, np.ndarray], ok: np.ndarray | None = None) -> np.ndarray:
    """``(n,)`` rows labelled in at least one task (encoded ``Y``), and ``ok`` (e.g. decoded) when given."""
    n = len(next(iter(Y.values()))) if Y else (0 if ok is None else len(ok))
    labelled = np.zeros(n, dtype=bool)
    for t in tasks:
        y = Y[t.name]
        labelled |= (y != MISSING) if t.kind == "class" else ~np.isnan(y).all(1)
    return labelled if ok is None else ok & labelled

"""Masked multi-task loss: missing labels contribute nothing, tasks are weighted."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from catalens.tasks import MISSING, TaskInfo


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """Per-class loss weights from training counts: ``balanced`` = n/(C*count), ``sqrt`` its root."""
    if mode == "none":
        return None
    counts = np.bincount(y[y != MISSING], minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    if mode == "sqrt":
        w = np.sqrt(w)
    w = w / w[counts > 0].mean()
    return torch.tensor(w, dtype=torch.float32)


def focal_ce(logits: torch.Tensor, y: torch.Tensor, gamma: float, weight, smoothing: float) -> torch.Tensor:
    """Focal loss (Lin et al.) on softmax outputs; rows with label -1 must be removed already."""
    ce = F.cross_entropy(logits, y, weight=weight, reduction="none", label_smoothing=smoothing)
    pt = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)
    return ((1 - pt) ** gamma * ce).mean()


def multitask_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: list[TaskInfo],
                   loss_weights: dict[str, float], weights: dict[str, torch.Tensor | None],
                   smoothing: float = 0.0, focal_gamma: float = 0.0) -> torch.Tensor:
    """Sum over tasks of ``weight * loss``; class targets ``(n,)`` int (-1 missing), tags ``(n,T)`` (NaN missing)."""
    total = logits[tasks[0].name].new_zeros(())
    for t in tasks:
        out, y = logits[t.name], targets[t.name]
        if t.kind == "class":
            keep = y != MISSING
            if not keep.any():
                continue
            if focal_gamma > 0:
                loss = focal_ce(out[keep], y[keep], focal_gamma, weights.get(t.name), smoothing)
            else:
                loss = F.cross_entropy(out[keep], y[keep], weight=weights.get(t.name), label_smoothing=smoothing)
        else:
            known = ~torch.isnan(y)
            if not known.any():
                continue
            loss = F.binary_cross_entropy_with_logits(out[known], y[known])
        total = total + loss_weights.get(t.name, 1.0) * loss
    return total

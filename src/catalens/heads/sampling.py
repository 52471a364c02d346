"""Which training rows each epoch visits: all (shuffled), class-balanced, or down-sampled.

- ``sampler="balanced"``: rows drawn with replacement with probability ∝ 1/count(class), so
  every class is seen about equally often; ``"sqrt"``: ∝ 1/sqrt(count) (half-way).
- ``max_per_class=K``: each epoch keeps at most ``K`` rows of any class, a fresh random
  choice every epoch (down-sampling of the largest classes; small classes keep all rows).

Both act on one class task: the one with the most classes (the leaf of the hierarchy).
Rows without a label in that task are always kept, with the median row weight. With both
off, the order is ``torch.randperm(n)``, exactly as without this module.
"""
from __future__ import annotations

import numpy as np
import torch

from catalens.tasks import MISSING, TaskInfo

SAMPLERS = ("none", "balanced", "sqrt")


def sampling_task(tasks: list[TaskInfo]) -> TaskInfo | None:
    """The class task with the most classes (first on ties), or None."""
    classes = [t for t in tasks if t.kind == "class"]
    return max(classes, key=lambda t: t.n_outputs) if classes else None


class EpochSampler:
    """Row order of every epoch for the options above; deterministic given the generator."""

    def __init__(self, Y: dict[str, np.ndarray], tasks: list[TaskInfo], sampler: str = "none",
                 max_per_class: int = 0) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}; got '{sampler}'")
        self.sampler = sampler
        self.max_per_class = int(max_per_class or 0)
        task = sampling_task(tasks)
        self.active = task is not None and (sampler != "none" or self.max_per_class > 0)
        if not self.active:
            return
        y = np.asarray(Y[task.name])
        self.n = len(y)
        self.unlabelled = np.flatnonzero(y == MISSING)
        self.groups = [np.flatnonzero(y == c) for c in range(task.n_outputs)]
        self.groups = [g for g in self.groups if len(g)]

    def epoch_size(self, n: int) -> int:
        """Rows per epoch (``n`` unless down-sampling)."""
        if not self.active or self.max_per_class <= 0:
            return n
        return len(self.unlabelled) + sum(min(len(g), self.max_per_class) for g in self.groups)

    def order(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """Indices of this epoch's rows, in training order."""
        if not self.active:
            return torch.randperm(n, generator=gen)
        cap = self.max_per_class
        pools = []
        for g in self.groups:
            if cap > 0 and len(g) > cap:
                g = g[torch.randperm(len(g), generator=gen)[:cap].numpy()]
            pools.append(g)
        if self.sampler == "none":
            rows = np.concatenate(pools + [self.unlabelled])
            return torch.from_numpy(rows[torch.randperm(len(rows), generator=gen).numpy()])
        power = 1.0 if self.sampler == "balanced" else 0.5
        weights = [np.full(len(g), len(g) ** -power) for g in pools]
        labelled_w = np.concatenate(weights) if weights else np.zeros(0)
        fill = float(np.median(labelled_w)) if labelled_w.size else 1.0
        rows = np.concatenate(pools + [self.unlabelled])
        w = np.concatenate([labelled_w, np.full(len(self.unlabelled), fill)])
        pick = torch.multinomial(torch.from_numpy(w / w.sum()), len(rows), replacement=True, generator=gen)
        return torch.from_numpy(rows[pick.numpy()])

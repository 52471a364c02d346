"""The torch module of a multi-task head: shared trunk, one output layer per task."""
from __future__ import annotations

import torch
from torch import nn

from catalens.tasks import TaskInfo


class MultiTaskNet(nn.Module):
    """Features ``(n, in_dim)`` → ``{task: logits (n, n_outputs)}``.

    Inputs are standardised with the training mean/std held as buffers, so the module is
    self-contained (exported graphs need nothing else).
    """

    def __init__(self, in_dim: int, tasks: list[TaskInfo], hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        width = in_dim
        if hidden > 0:
            layers += [nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.outputs = nn.ModuleDict({t.name: nn.Linear(width, t.n_outputs) for t in tasks})
        # per-task temperature (task order), fitted on validation data after training
        self.register_buffer("temperature", torch.ones(len(tasks)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # (n, D) -> {task: (n, C)}
        z = self.trunk((x - self.mean) / self.std)
        return {name: self.outputs[name](z) / self.temperature[i] for i, name in enumerate(self.task_names)}


class ProbabilityNet(nn.Module):
    """Logits → probabilities: softmax for class tasks, sigmoid for tags (used by export)."""

    def __init__(self, net: MultiTaskNet, kinds: dict[str, str]) -> None:
        super().__init__()
        self.net = net
        self.kinds = kinds

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(x)
        return {k: (v.softmax(-1) if self.kinds[k] == "class" else v.sigmoid()) for k, v in logits.items()}

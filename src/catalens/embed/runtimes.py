"""Inference runtimes: how a batch of uint8 pixels becomes features.

A runner is a callable ``(b, S, S, 3) uint8 ndarray -> (b, dim) float32 ndarray``.
Registered runtimes: ``eager`` (fp32, channels_last), ``bf16`` (autocast where the CPU
has native bf16). More (compile, onnx) are added by registering a factory.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from catalens.registry import Registry

RUNTIMES: Registry = Registry("runtime")


def to_tensor(batch: np.ndarray) -> torch.Tensor:
    """``(b, S, S, 3)`` uint8 → ``(b, 3, S, S)`` float32 in channels_last memory (no copy of layout)."""
    return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float()


@RUNTIMES.register("eager")
def eager_runner(module: nn.Module, size: int):
    module = module.eval().to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(to_tensor(batch)).float().numpy()

    return run


@RUNTIMES.register("bf16")
def bf16_runner(module: nn.Module, size: int):
    module = module.eval().to(memory_format=torch.channels_last)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(to_tensor(batch)).float().numpy()

    return run


def make_runner(name: str, module: nn.Module, size: int):
    """Build the runner registered as ``name``."""
    return RUNTIMES.create(name, module, size)

"""Several processes under ``torchrun``: what fine-tuning needs for DistributedDataParallel.

``torchrun --nproc_per_node=N -m catalens train DATA --out M --finetune ...`` starts N copies
of the command with ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` set. :func:`process_group`
joins them (NCCL when CUDA is available, gloo otherwise); rank 0 embeds, fits the linear
probe, decodes the pixels, precomputes the views, evaluates and writes every file; all ranks
train the fine-tuned part wrapped in DDP on their own shard of each epoch's permutation.

In a single process (no ``WORLD_SIZE``, or 1) every helper here is a no-op: rank 0 of 1.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch

# rank 0 alone embeds the catalogue and fits the probe while the others wait in a collective
TIMEOUT_ENV = "CATALENS_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 4 * 3600


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def _active() -> bool:
    """A process group is joined (and holds more than one process)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_distributed() -> bool:
    """Launched as one of several processes (torchrun)."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """CUDA when available (under torchrun the GPU of ``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank()) if is_distributed() else torch.device("cuda")
    return torch.device("cpu")


def cpu_threads() -> int:
    """torch threads per process: the CPUs shared among the processes of this machine."""
    from catalens.runtime import available_cpus

    return max(1, available_cpus() // local_world_size())


def init() -> bool:
    """Join the torchrun process group; False (nothing done) in a single process or when joined."""
    import torch.distributed as dist

    if _env_int("WORLD_SIZE", 1) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend(), timeout=timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    return True


def cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group():
    """:func:`init` on entry, :func:`cleanup` on exit (only of a group it started)."""
    started = init()
    try:
        yield
    finally:
        if started:
            cleanup()


def barrier() -> None:
    if not _active():
        return
    import torch.distributed as dist

    if backend() == "nccl":
        dist.barrier(device_ids=[local_rank()])
    else:
        dist.barrier()


@contextmanager
def rank0_first():
    """Rank 0 runs the block first (and writes its files); the others run it after, finding them done.

    The files must be on a file system every rank sees (any single machine; NFS across nodes).
    """
    if not _active():
        yield
        return
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (pickled in memory by torch.distributed; nothing on disk)."""
    if not _active():
        return obj
    import torch.distributed as dist

    buf = [obj if is_main() else None]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (in place)."""
    if not _active():
        return
    import torch.distributed as dist

    for t in module.state_dict().values():
        dist.broadcast(t, src=0)


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over the ranks."""
    if not _active():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather(value):
    """``[value of rank 0, value of rank 1, ...]`` (any picklable value)."""
    if not _active():
        return [value]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def shard(order: np.ndarray) -> np.ndarray:
    """This rank's part of one epoch's permutation, as ``DistributedSampler`` splits it.

    ``order`` (the same on every rank) is padded by repeating its start to a multiple of the
    world size, then rank ``r`` takes positions ``r, r + W, r + 2W, ...``: disjoint, equal
    lengths (DDP needs the same number of steps everywhere), together every row. With global
    batch ``W x b`` the ranks' batches ``s`` are, together, positions ``s*W*b .. (s+1)*W*b`` of
    ``order``: the batches a single process with batch size ``W x b`` would take.
    """
    w = world_size()
    if w <= 1:
        return order
    pad = (-len(order)) % w
    if pad:
        order = np.concatenate([order, np.resize(order, pad)])
    return order[rank()::w]


def wrap(module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel under torchrun (gradients averaged over ranks)."""
    if not _active():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # the buffers (frozen BatchNorm statistics, the heads' scaling) never change: no sync per forward
    # (newer torch names it forward_sync_buffers and deprecates broadcast_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   **{no_sync: False})

"""Learning-rate schedules for the heads and for fine-tuning: one-cycle, cosine, step, plateau.

Each is a *factor* of the configured learning rate, a pure function of the optimisation step
and (for ``plateau``) of the validation losses seen so far, so a resumed fine-tuning recomputes
it exactly. The learning rate of every epoch is written into the training history (``lr``),
which MLflow receives with the rest of it.

- ``onecycle``: warm-up from ``lr / 25`` to ``lr`` over ``warmup`` steps, then cosine to ~0
  (torch's ``OneCycleLR``; the heads' default);
- ``cosine``: linear warm-up from 0 over ``warmup`` steps, then cosine to 0 (fine-tuning's default);
- ``step``: after the warm-up, ``lr * gamma ** (epoch // step_epochs)``;
- ``plateau``: after the warm-up, ``lr * factor ** k`` where ``k`` is how many times the validation
  loss went ``patience`` epochs without improving (``ReduceLROnPlateau``'s rule; without a
  validation split it never reduces).
"""
from __future__ import annotations

import math

SCHEDULES = ("onecycle", "cosine", "step", "plateau")


def warmup_factor(step: int, warmup: int) -> float | None:
    """Linear warm-up ``(step + 1) / warmup`` while ``step < warmup``; None after."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return None


def schedule_factor(kind: str, step: int, total: int, warmup: int, steps_per_epoch: int,
                    step_epochs: int = 0, gamma: float = 0.1, plateau_drops: int = 0,
                    plateau_factor: float = 0.5) -> float:
    """The learning-rate factor of optimisation ``step`` (0-based) out of ``total``."""
    if kind not in SCHEDULES:
        raise ValueError(f"learning-rate schedule '{kind}' is not one of {', '.join(SCHEDULES)}")
    if kind == "onecycle":
        return onecycle_factor(step, total, warmup)
    w = warmup_factor(step, warmup)
    if w is not None:
        return w
    if kind == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))
    if kind == "step":
        epochs = max(1, total // max(1, steps_per_epoch))
        every = step_epochs or max(1, epochs // 3)
        return gamma ** (step // max(1, steps_per_epoch) // every)
    return plateau_factor ** plateau_drops


def onecycle_factor(step: int, total: int, warmup: int, div: float = 25.0, final_div: float = 1e4) -> float:
    """Torch's one-cycle (cosine annealing) as a factor of the peak: ``1/div`` at step 0, 1 at step
    ``warmup``, ``1/(div*final_div)`` at the last step ``total - 1``."""
    warmup = max(1, warmup)
    lo, end = 1.0 / div, 1.0 / (div * final_div)
    if step < warmup:
        return lo + (1.0 - lo) * 0.5 * (1.0 - math.cos(math.pi * step / warmup))
    span = max(1, total - 1 - warmup)
    t = min(1.0, (step - warmup) / span)
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def plateau_drops(val_losses: list[float], patience: int, threshold: float = 1e-4) -> int:
    """How many times ``ReduceLROnPlateau`` (mode min, relative threshold, no cooldown) would have
    reduced the learning rate after these per-epoch validation losses."""
    best, bad, drops = math.inf, 0, 0
    for v in val_losses:
        if v < best * (1 - threshold):
            best, bad = v, 0
        else:
            bad += 1
            if bad > patience:
                drops, bad = drops + 1, 0
    return drops


def schedule_params(section) -> dict:
    """The schedule keys of a config section (``head`` or ``finetune``) as keyword arguments."""
    return {"schedule": section.schedule, "step_epochs": section.step_epochs, "gamma": section.gamma,
            "plateau_patience": section.plateau_patience, "plateau_factor": section.plateau_factor}

"""Learning-rate schedule as a pure function of the step.

Why a function and not a stateful scheduler object: the rate at step s depends only on (s, the run's
target steps, the config), so a resumed run is on the same curve by construction, whatever step it was
interrupted at, and nothing about the schedule has to be checkpointed.
"""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total_steps: int) -> int:
    """--warmup < 1 is a fraction of the run, otherwise a number of steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup: int, schedule: str = "linear",
          min_ratio: float = 0.0) -> float:
    """LR used for optimizer step `step` (0-based): linear warm-up to `peak_lr`, then decay to
    `min_ratio * peak_lr` at `total_steps` (linear or cosine), or constant."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "constant":
        return peak_lr
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "linear":
        factor = 1.0 - progress
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return peak_lr * (min_ratio + (1.0 - min_ratio) * factor)

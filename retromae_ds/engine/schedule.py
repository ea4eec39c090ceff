"""Learning-rate schedule as a pure function of the step.

Why a function and not a stateful scheduler object: the rate at step s depends only on (s, the run's
target steps, the config), so a resumed run is on the same curve by construction, whatever step it was
interrupted at, and nothing about the schedule has to be checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_steps(warmup: float, total_steps: int) -> int:
    """--warmup < 1 is a fraction of the run, otherwise a number of steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_at(step: float, *, peak_lr: float, total_steps: int, warmup: int, schedule: str = "linear",
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


# Steps over which the LR ramps back up after a resume with a new world size (Adam's moments restart):
# with fresh moments, Adam's first updates are about +-lr per coordinate whatever the gradient's scale
# (the bias-corrected m/sqrt(v) of one sample is its sign), so the trained weights get a jolt at full LR.
# 100 steps lets the second-moment estimate average over ~100 gradients first; never longer than the
# run's own warm-up (a run with no warm-up asked for none).
REWARM_STEPS = 100


@dataclass(frozen=True)
class RunSchedule:
    """The run's length and LR curve, in optimizer steps of the run's FIRST global batch (`batch`).

    Why samples and not steps: a resume with another world size changes the global batch. If the
    schedule were re-derived in new steps while the restored step counted old ones, the LR would jump
    and an --epochs run would end early or late. So the schedule is fixed once, in units of the first
    segment's global batch (stored in every checkpoint); the position on it is samples consumed /
    `batch`, whatever the current global batch is. With an unchanged world size the position is the
    step number exactly, so nothing changes for ordinary resumes.
    """

    batch: int  # the global batch the schedule was defined with
    total_steps: int  # run length, in steps of `batch`
    warmup: int  # warm-up, in steps of `batch`

    @property
    def end_samples(self) -> int:
        return self.total_steps * self.batch

    def position(self, consumed_samples: int) -> float:
        return consumed_samples / self.batch

    def rewarm_steps(self) -> int:
        return min(REWARM_STEPS, self.warmup)


def plan_schedule(*, max_steps: int, epochs: float, warmup: float, num_samples: int, batch: int) -> RunSchedule:
    """--max-steps counts steps of `batch`; --epochs counts passes over `num_samples`."""
    total = max_steps or math.ceil(epochs * num_samples / batch)
    return RunSchedule(batch=batch, total_steps=total, warmup=warmup_steps(warmup, total))

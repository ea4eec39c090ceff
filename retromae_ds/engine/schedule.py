"""The learning rate of every step: the schedule, the re-warm after a resume on a new world size, and the
new-parts warm-up's encoder factor, decided in one place (`LearningRates`).

Why pure functions of the position and not a stateful scheduler object: the rate of a step depends only
on (the samples consumed before it, the run's plan, the flags), so a resumed run is on the same curve by
construction, whatever step it was interrupted at. What is checkpointed is the plan, not a state: the
`RunSchedule` (the first global batch, the length, the warm-up, wsd's decay start), so that a resume with
another global batch or another --max-steps knows the curve it is on; the re-warm start and the new-parts
phase travel in the run's state (`RunState`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from retromae_ds.engine.new_parts import NewPartsWarmup


def warmup_steps(warmup: float, total_steps: int) -> int:
    """--warmup < 1 is a fraction of the run, otherwise a number of steps."""
    return int(round(warmup * total_steps)) if warmup < 1 else int(warmup)


def decay_start_step(total_steps: int, warmup: int, decay_fraction: float) -> int:
    """wsd: the step (0-based) at which the decay begins: the last `decay_fraction` of the run, never
    inside the warm-up."""
    return max(int(warmup), total_steps - int(round(decay_fraction * total_steps)))


def lr_at(step: float, *, peak_lr: float, total_steps: int, warmup: int, schedule: str = "linear",
          min_ratio: float = 0.0, decay_start: float | None = None) -> float:
    """LR used for optimizer step `step` (0-based): linear warm-up to `peak_lr`, then decay to
    `min_ratio * peak_lr` at `total_steps` (linear or cosine), or constant.

    "wsd" (warm-up, stable, decay): after the warm-up the LR stays at `peak_lr` until `decay_start`
    (see `decay_start_step`), then falls as 1 - sqrt(progress) to `min_ratio * peak_lr` at `total_steps`.
    Why 1-sqrt and not linear: it leaves the peak fast and then spends most of the decay at low rates,
    which gave lower final losses than a linear cooldown of the same length in Hägele et al. 2024
    ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"); the stable phase
    is what makes a run extendable: any checkpoint before `decay_start` can start another decay."""
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    if schedule == "constant":
        return peak_lr
    if schedule == "wsd":
        if decay_start is None:
            raise ValueError("schedule 'wsd' needs decay_start")
        if step < decay_start:
            return peak_lr
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, total_steps - decay_start)))
        return peak_lr * (min_ratio + (1.0 - min_ratio) * (1.0 - math.sqrt(progress)))
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
    decay_start: int | None = None  # wsd: first step of the decay, in steps of `batch` (None: another schedule)

    @property
    def end_samples(self) -> int:
        return self.total_steps * self.batch

    def position(self, consumed_samples: int) -> float:
        return consumed_samples / self.batch

    def rewarm_steps(self) -> int:
        return min(REWARM_STEPS, self.warmup)

    def reaches_decay_start(self, consumed_samples: int, global_batch: int) -> bool:
        """The step that just consumed up to `consumed_samples` is the first one to reach the decay start
        (position before it < decay_start <= position after it): its checkpoint holds only steps of the
        stable phase, the latest such state, and a new decay can branch from it. With an unchanged world
        size that is exactly step `decay_start`; a resume with another one lands on the first step past it."""
        if self.decay_start is None or self.decay_start <= 0:
            return False
        start = self.decay_start * self.batch
        return consumed_samples - global_batch < start <= consumed_samples

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LearningRates:
    """The LR of each step, and the encoder's (the only two rates the optimizer's groups get).

    - the schedule's rate at the position samples consumed / the schedule's batch (`lr_at`);
    - after a resume on a new world size (`rewarm_from`: the step it resumed at), that rate ramped back up
      over `RunSchedule.rewarm_steps()` steps, because Adam's moments restarted;
    - the encoder's rate: the new-parts warm-up's factor (0 while the new parts train alone) times it."""

    schedule: RunSchedule
    peak_lr: float
    kind: str = "linear"  # linear | cosine | constant | wsd
    min_ratio: float = 0.0
    rewarm_from: int | None = None
    new_parts: NewPartsWarmup = NewPartsWarmup()

    def at(self, consumed_samples: int, step: int) -> tuple[float, float]:
        """(LR, the encoder's LR) for the optimizer step `step` (0-based), which starts after
        `consumed_samples` samples."""
        plan = self.schedule
        position = plan.position(consumed_samples)
        lr = lr_at(position, peak_lr=self.peak_lr, total_steps=plan.total_steps, warmup=plan.warmup,
                   schedule=self.kind, min_ratio=self.min_ratio, decay_start=plan.decay_start)
        if self.rewarm_from is not None and plan.rewarm_steps():
            lr *= min(1.0, (step - self.rewarm_from + 1) / plan.rewarm_steps())
        return lr, lr * self.new_parts.encoder_factor(position)


def plan_schedule(*, max_steps: int, epochs: float, warmup: float, num_samples: int, batch: int,
                  schedule: str = "linear", decay_fraction: float = 0.2, previous: dict | None = None) -> RunSchedule:
    """--max-steps counts steps of `batch`; --epochs counts passes over `num_samples`.

    `previous`: the schedule saved in the checkpoint a run resumes from (`RunSchedule.to_dict()`), or None.
    The run's length always follows the current --max-steps/--epochs. For wsd, a resume that changes the
    length keeps the checkpoint's warm-up in steps: that is how a new decay branches from a checkpoint of
    the stable phase (a fractional --warmup re-derived from the new length would send the LR back into
    warm-up). Other schedules are re-derived from the current flags, as before."""
    total = max_steps or math.ceil(epochs * num_samples / batch)
    warm = warmup_steps(warmup, total)
    if schedule == "wsd" and previous and previous.get("decay_start") is not None \
            and int(previous["total_steps"]) != total and int(previous["batch"]) == batch:
        warm = int(previous["warmup"])
    decay = decay_start_step(total, warm, decay_fraction) if schedule == "wsd" else None
    return RunSchedule(batch=batch, total_steps=total, warmup=warm, decay_start=decay)


def resume_note(previous: dict | None, sched: RunSchedule, position: float, lr_kw: dict) -> str | None:
    """What a resume that changed the run's length (--max-steps / --epochs) or the wsd decay start does to
    the LR curve, for the log; None when neither changed (or the checkpoint predates saved schedules). `lr_kw`:
    peak_lr, schedule and min_ratio, as the trainer passes them to lr_at."""
    if not previous or (int(previous["total_steps"]), previous.get("decay_start")) == (sched.total_steps,
                                                                                       sched.decay_start):
        return None
    old = RunSchedule(**{k: previous[k] for k in ("batch", "total_steps", "warmup", "decay_start") if k in previous})

    def at(s: RunSchedule) -> float:
        return lr_at(position, total_steps=s.total_steps, warmup=s.warmup, decay_start=s.decay_start, **lr_kw)

    # the checkpoint's curve, when it can be told: a run that switches to wsd had no decay start
    before = None if old.decay_start is None and sched.decay_start is not None else at(old)
    change = f"{before:.3g} -> {at(sched):.3g}" if before is not None else f"{at(sched):.3g}"
    text = (f"resumed at step {position:g} with a run of {sched.total_steps} steps (the checkpoint's: "
            f"{old.total_steps}; steps of the schedule's global batch {sched.batch}): ")
    if sched.decay_start is None:
        return text + f"the {lr_kw.get('schedule')} schedule is re-derived for the new length: LR {change} here."
    text += (f"the wsd decay now runs from step {sched.decay_start} to {sched.total_steps} (warm-up kept at "
             f"{sched.warmup} steps); LR {change} here.")
    if old.decay_start is not None and position > old.decay_start:
        text += (f" This checkpoint is past the old decay start (step {old.decay_start}), so the LR climbs back; to "
                 f"branch a new decay, resume from the checkpoint kept at the decay start instead.")
    return text

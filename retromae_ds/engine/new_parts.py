"""`--new-parts-warmup-steps N`: train the parts a checkpoint lacked before the encoder they sit on.

Why. Most runs continue from an embedding model published without an MLM head or a RetroMAE decoder
(sentence-transformers, bge, e5 checkpoints; the bundled MiniLM has no MLM head): both start random, and
their first gradients reach the pretrained encoder at the full learning rate. Measured: the demo (MiniLM,
lr 1e-4, 100 steps) lowered Lee Pearson [CLS] 0.609 -> 0.534; from MiniLM at lr 5e-4, held-out MRR@10 fell
0.44 -> 0.12. With N > 0, the first N steps (N x the run's first global batch samples, as
the schedule counts them) train only the new parts (the parameter-name prefixes the
model recorded when it was loaded, `RetroMAEForPretraining.new_parts`: "lm.cls" for a missing BERT head,
"c_head" when the folder has no decoder); the encoder (everything else, the tied word embeddings that
the head projects with included) is held still.

How "held still" works: one more split of the optimizer's parameter groups (`param_groups`), new parts
apart from the encoder, and the LR the trainer sets on every group each step (`Trainer.train_step`): the
encoder's groups get `encoder_lr_ratio` (default 0) x the scheduled LR for steps < N, the scheduled LR
after. With LR 0, AdamW leaves a weight bit for bit unchanged: its decoupled weight decay multiplies the
weight by (1 - lr x decay) = 1 and its update is lr x m / (sqrt(v) + eps) = 0. That holds for torch's AdamW
(what the trainer runs on the device) and DeepSpeed's CPU Adam (offload), under every ZeRO stage, since
ZeRO steps the same optimizer on its fp32 partitions group by group; tests/test_new_parts_warmup.py
checks it bit for bit on the saved weights.

Why not `requires_grad = False` (or leaving the encoder out of the optimizer): DeepSpeed builds its flat
fp32 partitions, gradient buckets and (ZeRO-3) parameter hooks once, from what `deepspeed.initialize`
got; flipping `requires_grad` at step N breaks those buffers, and re-creating the engine mid-run would
change its checkpoints. An LR per group is one mechanism for every stage, offload and resume.

Adam's moments of the encoder: the gradients still flow into it during the phase (the head and the
decoder read its output; backward computes them anyway), so Adam's m and v accumulate for the encoder
while its LR is 0. They are kept, not zeroed at step N: zeroing would reach into DeepSpeed's partitioned
optimizer state (laid out differently per stage and with offload) and leave Adam's step count, and so
its bias correction, out of step with the moments. Keeping them errs on the safe side: the phase's
gradients (against a head that is still random) are the run's largest, so v is large when the encoder
starts and its first updates are smaller than lr x sign (a softer start), while m forgets the phase
within ~1 / (1 - beta1) = 10 steps. Gradient clipping by global norm still counts the encoder's
gradients during the phase; Adam's update barely depends on that scale.

The schedule is unchanged: the main warm-up (--warmup) runs concurrently with the phase, and at step N
the encoder's LR becomes the schedule's LR of that step. The phase is a pure function of the schedule's
position (samples consumed / the run's first global batch: the step, while the global batch is
unchanged), like the schedule, so a resume anywhere, with any global batch, continues the same run; the checkpoint records it (`RunState.
new_parts_warmup`), and `plan` refuses a resume whose flags would have trained the steps already done
differently. From random init (--model-config) every part is new: the flag then does nothing (a note says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from retromae_ds.errors import UserError

NEW_PART_KEY = "new_part"  # the key, in each optimizer parameter group, telling new parts from the encoder


@dataclass(frozen=True)
class NewPartsWarmup:
    """The phase of a run: schedule positions 0..steps (steps 1..steps as logged, at the run's first global
    batch) train `parts` at the scheduled LR and the rest at `encoder_lr_ratio` x that LR. `steps` 0 = no
    phase."""

    steps: int = 0
    encoder_lr_ratio: float = 0.0
    parts: tuple[str, ...] = ()

    def encoder_factor(self, position: float) -> float:
        """The encoder's LR as a fraction of the scheduled LR for the step that starts at schedule position
        `position` (samples consumed before it / the schedule's batch; the 0-based step count while the
        global batch is the run's first)."""
        return self.encoder_lr_ratio if position < self.steps else 1.0

    def splits_groups(self) -> bool:
        return self.steps > 0 and bool(self.parts)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "encoder_lr_ratio": self.encoder_lr_ratio, "parts": list(self.parts)}

    @classmethod
    def from_dict(cls, values: dict | None) -> "NewPartsWarmup":
        """A checkpoint's record; {} or None (a checkpoint from before this option) is no phase."""
        values = values or {}
        return cls(steps=int(values.get("steps", 0)), encoder_lr_ratio=float(values.get("encoder_lr_ratio", 0.0)),
                   parts=tuple(values.get("parts", ())))

    def describe(self) -> str:
        held = "held at LR 0" if self.encoder_lr_ratio == 0 else f"at {self.encoder_lr_ratio:g} x the LR"
        return (f"new-parts warm-up: steps 1-{self.steps} train only {', '.join(self.parts)} (freshly "
                f"initialised), the encoder {held}; from step {self.steps + 1} on the encoder follows the schedule")


def is_new(name: str, parts: tuple[str, ...]) -> bool:
    """Whether parameter `name` (as `model.named_parameters()` gives it) belongs to one of `parts`."""
    return any(name == p or name.startswith(p + ".") for p in parts)


def trainable_new_parts(model) -> tuple[str, ...] | None:
    """The model's new parts that hold trainable parameters (the decoder of --objective mlm is frozen and
    not counted); None when all of the model is new (random init)."""
    parts = getattr(model, "new_parts", None)
    if parts is None:
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return tuple(p for p in parts if any(is_new(n, (p,)) for n in names))


def plan(steps: int, encoder_lr_ratio: float, model, previous: dict | None, resumed_step: float | None,
         where: str = "the checkpoint") -> tuple[NewPartsWarmup, str | None]:
    """The run's phase and a note for the log (None: nothing to say).

    `steps`, `encoder_lr_ratio`: the flags. `previous`: the checkpoint's record (`RunState.new_parts_warmup`;
    None for a checkpoint written before this option) and `resumed_step` its schedule position (its step
    when the global batch never changed), or both None for a fresh
    start. A resume keeps the checkpoint's parts (its optimizer's parameter groups are split by them) and
    takes the flags' phase when the steps already done ran the same under it (the same steps 1..min(N, step)
    held the encoder, at the same ratio): the flags may lengthen or end a phase still under way. Where the
    phase is over under both, the future is the same either way: the checkpoint's record stays. Anything
    else would make a run that neither flag setting describes: refused."""
    parts = trainable_new_parts(model)
    note = None
    wanted = NewPartsWarmup(steps, encoder_lr_ratio, parts or ())
    if steps and parts is None:
        note = (f"--new-parts-warmup-steps {steps} does nothing here: from random init every part is new "
                f"(the flag is for continuing from a pretrained encoder that lacks an MLM head or decoder)")
        wanted = NewPartsWarmup(0, encoder_lr_ratio, ())
    elif steps and not parts:
        note = (f"--new-parts-warmup-steps {steps} does nothing here: the model folder holds every part (MLM "
                f"head and decoder), nothing is freshly initialised")
        wanted = NewPartsWarmup(0, encoder_lr_ratio, ())
    if resumed_step is None:
        return wanted, note
    old = NewPartsWarmup.from_dict(previous)
    if not old.splits_groups():
        old = NewPartsWarmup(0, old.encoder_lr_ratio, ())
    s = resumed_step
    done_old, done_new = min(old.steps, s), min(wanted.steps, s)
    if (old.steps, old.encoder_lr_ratio) == (wanted.steps, wanted.encoder_lr_ratio) or \
            (old.steps == 0 and wanted.steps == 0):
        return old, note
    if old.steps <= s and wanted.steps <= s:
        return old, (f"--new-parts-warmup-steps {wanted.steps}: this run's new-parts warm-up "
                     f"{'ended at step ' + str(old.steps) if old.steps else 'was off'} and the run is at step {s:g}, "
                     f"so nothing changes from here; the checkpoint's record stays")
    same_past = done_old == done_new and (done_old == 0 or old.encoder_lr_ratio == wanted.encoder_lr_ratio)
    if same_past and old.steps > 0:  # a phase under way, lengthened or ended now: same parameter groups
        return NewPartsWarmup(wanted.steps, wanted.encoder_lr_ratio, old.parts), (
            f"the new-parts warm-up now ends at step {wanted.steps} (the checkpoint's run: step {old.steps})")
    ran = (f"held the encoder at {old.encoder_lr_ratio:g} x the LR for steps 1-{old.steps}"
           if old.steps else "trained the encoder from step 1 (no new-parts warm-up)")
    asked = (f"--new-parts-warmup-steps {wanted.steps} --new-parts-encoder-lr-ratio {wanted.encoder_lr_ratio:g}"
             if wanted.steps else f"--new-parts-warmup-steps {steps} (which does nothing for this model)"
             if steps else "no --new-parts-warmup-steps")
    keep = (f"--new-parts-warmup-steps {old.steps} --new-parts-encoder-lr-ratio {old.encoder_lr_ratio:g}"
            if old.steps else "--new-parts-warmup-steps 0")
    end_now = f"; to end the phase now, --new-parts-warmup-steps {math.ceil(s)}" if old.steps > s else ""
    raise UserError(f"{where} (step {s:g}) {ran}; {asked} would have trained steps 1-{s:g} differently, so the resumed "
                    f"run would match neither setting. Resume with {keep}{end_now}, or start afresh "
                    f"(--resume none, another --output-dir).")


def param_groups_by_part(groups: list[dict], model, parts: tuple[str, ...]) -> list[dict]:
    """`groups` (each {"params": [...], ...}, from build.param_groups) split into encoder groups and
    new-part groups (NEW_PART_KEY False / True; same settings otherwise, empty groups dropped). The split
    changes nothing numerically: AdamW is elementwise, clipping uses the global norm."""
    new_ids = {id(p) for n, p in model.named_parameters() if is_new(n, parts)}
    out = []
    for flag in (False, True):
        for group in groups:
            params = [p for p in group["params"] if (id(p) in new_ids) == flag]
            if params:
                out.append({**group, "params": params, NEW_PART_KEY: flag})
    return out


def count(model, parts: tuple[str, ...]) -> tuple[int, int]:
    """(trainable parameters in `parts`, trainable parameters elsewhere)."""
    new = other = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            n = getattr(p, "ds_numel", p.numel())
            if is_new(name, parts):
                new += n
            else:
                other += n
    return new, other

"""The run's counters: what the loop advances and what a checkpoint stores to continue it exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    """Saved in every checkpoint's client state under these same names (so checkpoints written before
    this class existed resume unchanged; a field they lack takes its default)."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # real tokens trained on, [CLS]/[SEP] included, padding not
    skipped_steps: int = 0  # steps skipped for a NaN/inf loss or gradient
    loss_scale_skips: int = 0  # fp16 steps skipped while DeepSpeed lowered its loss scale (not faults)
    rewarm_from: int | None = None  # step of the last resume with a new world size (the LR re-warms from it)
    first_eval: dict = field(default_factory=dict)  # the evaluation before step 1, for the final comparison
    # --new-parts-warmup-steps as this run applies it: {"steps", "encoder_lr_ratio", "parts"} (engine/new_parts.py);
    # {} in checkpoints from before the option (no phase)
    new_parts_warmup: dict = field(default_factory=dict)

    def to_client_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_client_state(cls, client: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in client.items() if k in names})

"""metrics.jsonl + TensorBoard: what a run logs, where, and under which tags.

`MetricsLogger` appends one flat JSON object per log call to OUTPUT_DIR/metrics.jsonl and writes the
same numbers as TensorBoard scalars. Tag scheme:
    train/<key>   losses, accuracy, lr, grad_norm, loss_scale, skipped_steps, tokens_seen, epoch
    perf/<key>    the keys of `PERF_KEYS` (tokens/s, samples/s, TFLOPs, MFU, step/data-wait time,
                  peak memory, padding efficiency: real tokens / computed token positions)
    eval/<key>    evaluation records, e.g. eval/lee/spearman_cls, eval/heldout/mrr10
metrics.jsonl records are {"step": s, "kind": "train" | "eval", **metrics}; non-finite numbers are
written as null so that the file stays strict JSON (jq, pandas). On resume, records of the
interrupted run with step > the resumed step are dropped (atomic rewrite) and TensorBoard events after
that step are purged, and a record of a (step, kind) already logged is not written again (re-running a
finished run's command re-evaluates its last step): every step appears once. A fresh start in a
folder that holds an earlier run's records starts them over.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# Keys of a train record that describe speed and memory rather than optimisation (what
# `throughput.Throughput.summary` reports): TensorBoard puts them under perf/ so the two groups sit
# apart in the UI.
PERF_KEYS = frozenset({
    "tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s", "tflops_per_device", "mfu",
    "peak_host_mem_gb", "peak_device_mem_gb", "peak_tflops", "padding_efficiency",
})


def _json_value(value):
    """Numbers as plain Python numbers (numpy/torch scalars included); non-finite as None."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, int):
        return value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_metrics(path, kind: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl (or of OUTPUT_DIR/metrics.jsonl given the folder), optionally only
    one kind. A half-written last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                records.append(record)
    return records


def truncate_metrics(path, step: int) -> None:
    """Rewrite metrics.jsonl keeping only records with step <= `step` (and dropping unreadable
    lines): write a temporary file, then rename it over the original, so a crash leaves either file
    whole."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Rank-0 writer of metrics.jsonl and TensorBoard scalars (see the module docstring for tags).

    `resume_step`: the step a resumed run starts from (None: a fresh start). Records of an earlier run
    with a larger step (a fresh start: all of them) are dropped from metrics.jsonl and TensorBoard events
    from resume_step + 1 on are purged, so an interrupted-and-resumed run reads like an uninterrupted one.
    With enabled=False (ranks != 0) every method does nothing.
    """

    def __init__(self, output_dir, tensorboard_dir=None, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir else self.output_dir / "tensorboard"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept_until = -1 if resume_step is None else resume_step
        truncate_metrics(self.path, kept_until)
        self._logged = {(int(r.get("step", 0)), r.get("kind", "train")) for r in read_metrics(self.path)}
        self._file = open(self.path, "a", encoding="utf-8")

        from torch.utils.tensorboard import SummaryWriter

        had_events = self.tensorboard_dir.is_dir() and any(self.tensorboard_dir.glob("events.out.tfevents.*"))
        purge = kept_until + 1 if (kept_until > 0 or had_events) else None
        self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge)

    def truncate_after(self, step: int) -> None:
        """Keep only metrics.jsonl records with step <= `step` (atomic rewrite); logging continues."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        truncate_metrics(self.path, step)
        self._logged = {(s, kind) for s, kind in self._logged if s <= step}
        self._file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def tag(key: str, kind: str = "train") -> str:
        if kind == "eval":
            return f"eval/{key}"
        if kind == "train":
            return f"perf/{key}" if key in PERF_KEYS else f"train/{key}"
        return f"{kind}/{key}"

    def log(self, step: int, metrics: dict, kind: str = "train") -> bool:
        """Append {"step", "kind", **metrics} to metrics.jsonl (flushed) and write each number as a
        TensorBoard scalar. None values are left out; NaN/inf go to TensorBoard as they are and to
        the JSON file as null. Returns False (writes nothing) when this step of this kind is logged."""
        if not self.enabled or (int(step), kind) in self._logged:
            return False
        self._logged.add((int(step), kind))
        values = {k: v for k, v in metrics.items() if v is not None and not isinstance(v, (str, dict, list))}
        record = {"step": int(step), "kind": kind}
        record.update({k: _json_value(v) for k, v in values.items() if k not in ("step", "kind")})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        for key, value in values.items():
            try:
                number = float(value.item() if hasattr(value, "item") else value)
            except (TypeError, ValueError):
                continue
            self._writer.add_scalar(self.tag(key, kind), number, global_step=int(step))
        self._writer.flush()
        return True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

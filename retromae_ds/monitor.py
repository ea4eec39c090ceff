"""What a training run reports: metrics.jsonl + TensorBoard, throughput/FLOPs/MFU, a progress bar.

Three small pieces the trainer drives, all quiet on ranks other than 0 (pass `enabled=False`):

- `MetricsLogger` appends one flat JSON object per log call to OUTPUT_DIR/metrics.jsonl and writes
  the same numbers as TensorBoard scalars. Tag scheme:
      train/<key>   losses, accuracy, lr, grad_norm, loss_scale, skipped_steps, tokens_seen, epoch
      perf/<key>    the keys of `PERF_KEYS` (tokens/s, samples/s, TFLOPs, MFU, step/data-wait time,
                    peak memory)
      eval/<key>    evaluation records, e.g. eval/lee/spearman_cls, eval/heldout/mrr10
  metrics.jsonl records are {"step": s, "kind": "train" | "eval", **metrics}; non-finite numbers
  are written as null so that the file stays strict JSON (jq, pandas). On resume, records of the
  interrupted run with step > the resumed step are dropped (atomic rewrite) and TensorBoard events
  after that step are purged, so every step appears once.
- `Throughput` turns per-step timings into global tokens/s and samples/s, TFLOPs per device, MFU and
  peak memory, using the FLOP formula of `retromae_flops_per_sample` and the peak table of
  `peak_flops_per_device`.
- `ProgressBar`: tqdm when stderr is a terminal, plain log lines otherwise (SLURM logs).
- `StepProfiler` (--profile-steps A-B): a torch.profiler trace of a few steps on rank 0 plus a summary
  (host and device time per step, operators and kernel launches per step, the top operators).

torch, tensorboard and tqdm are imported inside the functions that need them, so importing this
module (and `retromae-ds --help`) stays instant.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"

# Keys of a train record that describe speed and memory rather than optimisation: TensorBoard puts
# them under perf/ so the two groups sit apart in the UI.
PERF_KEYS = frozenset({
    "tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s", "tflops_per_device", "mfu",
    "peak_host_mem_gb", "peak_device_mem_gb", "peak_tflops",
})


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def transformer_layer_flops(seq_len: float, hidden: int, intermediate: int) -> float:
    """Forward matmul FLOPs of one BERT-shaped layer on `seq_len` query rows and `seq_len` keys.

    Q, K, V projections 3 * 2*L*h*h; scores Q K^T 2*L*L*h; weights x V 2*L*L*h; output projection
    2*L*h*h; feed-forward 2 * 2*L*h*f. (A multiply-add counts as 2 FLOPs.)
    """
    L, h, f = seq_len, hidden, intermediate
    return 8 * L * h * h + 4 * L * L * h + 4 * L * h * f


def mlm_head_flops(rows: float, hidden: int, vocab_size: int) -> float:
    """Forward FLOPs of a BERT MLM head on `rows` positions: transform dense h x h, then the
    projection to the vocabulary h x V."""
    return 2 * rows * hidden * hidden + 2 * rows * hidden * vocab_size


def retromae_flops_per_sample(model_config, seq_len: float, *, objective: str = "retromae",
                              num_encoder_masked: float | None = None, num_decoder_labelled: float | None = None,
                              fast_heads: bool = True, encoder_mask_ratio: float = 0.3) -> float:
    """Training FLOPs (forward + backward) of one sample of `seq_len` tokens ([CLS] and [SEP] included).

    Counted (matrix multiplications only, as in the usual MFU convention):
    - the encoder: num_hidden_layers x `transformer_layer_flops(L)` (attention scores included);
    - the decoder (retromae, dupmae): one layer of the same shape, L query rows over L keys;
    - the MLM head (`mlm_head_flops`) on the rows it is applied to. With fast heads that is the
      labelled rows only: the encoder's masked tokens (`num_encoder_masked`, by default
      `encoder_mask_ratio` of the L - 2 real tokens) and the decoder's labels (`num_decoder_labelled`,
      by default all L - 2 real tokens). Without fast heads, and for the DupMAE encoder (its
      bag-of-words pools logits over every position), the head runs on all L rows.
    - backward = 2 x forward, so training = 3 x forward. Activation-checkpoint recomputation is not
      counted (this is model FLOPs, not hardware FLOPs).
    Not counted: embeddings (lookups), LayerNorm, softmax, GELU, the losses, the optimizer: all
    linear in L*h or L*V with a small constant, below 1% for BERT-base at L=512.

    `objective` "mlm" is the encoder MLM alone (no decoder). Checked against
    torch.utils.flop_counter on a Hugging Face BertForMaskedLM in tests/test_monitor.py.
    """
    if objective not in ("retromae", "dupmae", "mlm"):
        raise ValueError(f"objective must be retromae, dupmae or mlm, got {objective!r}")
    h = int(model_config.hidden_size)
    f = int(model_config.intermediate_size)
    layers = int(model_config.num_hidden_layers)
    vocab = int(model_config.vocab_size)
    L = float(seq_len)
    real = max(L - 2.0, 0.0)
    enc_rows = num_encoder_masked if num_encoder_masked is not None else encoder_mask_ratio * real
    dec_rows = num_decoder_labelled if num_decoder_labelled is not None else real
    if not fast_heads or objective == "dupmae":
        enc_rows = L
    if not fast_heads:
        dec_rows = L

    forward = layers * transformer_layer_flops(L, h, f) + mlm_head_flops(enc_rows, h, vocab)
    if objective != "mlm":
        forward += transformer_layer_flops(L, h, f) + mlm_head_flops(dec_rows, h, vocab)
    return 3.0 * forward


# ------------------------------------------------------------------------------------------------
# Peak device FLOPs
# ------------------------------------------------------------------------------------------------

# Dense (no sparsity) peak TFLOPs from the vendors' data sheets: (pattern on the device name,
# bf16, fp16, tf32, fp32). bf16/fp16 are tensor-core peaks with fp32 accumulation; None where the
# type has no tensor-core support. More specific names come first (A100 before A10, H100 PCIe
# before H100).
_PEAK_TFLOPS = [
    (r"H100.*PCIe", 756.0, 756.0, 378.0, 51.2),
    (r"H100.*NVL", 835.0, 835.0, 418.0, 60.0),
    (r"H100|H800", 989.4, 989.4, 494.7, 66.9),
    (r"H200", 989.4, 989.4, 494.7, 66.9),
    (r"B200", 2250.0, 2250.0, 1100.0, 80.0),
    (r"A100|A800", 312.0, 312.0, 156.0, 19.5),
    (r"A10G", 70.0, 70.0, 35.0, 31.2),
    (r"\bA10\b", 125.0, 125.0, 62.5, 31.2),
    (r"L40S", 362.1, 362.1, 183.0, 91.6),
    (r"\bL40\b", 181.0, 181.0, 90.5, 90.5),
    (r"\bL4\b", 121.0, 121.0, 60.0, 30.3),
    (r"RTX A6000", 154.8, 154.8, 77.4, 38.7),
    (r"RTX 6000 Ada", 364.2, 364.2, 182.1, 91.1),
    (r"RTX 4090", 165.2, 165.2, 82.6, 82.6),
    (r"RTX 3090", 71.0, 71.0, 35.6, 35.6),
    (r"V100", None, 125.0, None, 15.7),
    (r"\bT4\b", None, 65.0, None, 8.1),
    (r"MI300X", 1307.4, 1307.4, 653.7, 163.4),
    (r"MI250X?", 383.0, 383.0, None, 47.9),
]


def lookup_peak_tflops(device_name: str, dtype: str, *, tf32: bool = False) -> float | None:
    """Peak dense TFLOPs of a named GPU for a training dtype ("bf16", "fp16", "fp32"); None if the
    device is not in the table. fp32 uses the TF32 tensor-core peak when `tf32` is on (PyTorch's
    float32 matmul precision "high"/"medium"), else the plain fp32 peak."""
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    for pattern, bf16, fp16, tf32_peak, fp32 in _PEAK_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if dtype == "bf16":
                return bf16 if bf16 is not None else fp32  # no bf16 tensor cores: runs at fp32 speed
            if dtype == "fp16":
                return fp16
            return tf32_peak if (tf32 and tf32_peak is not None) else fp32
    return None


def peak_flops_per_device(device, dtype: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `dtype`: `override` (FLOP/s) if given, else the data-sheet peak
    of the CUDA device by `torch.cuda.get_device_name`; None for CPUs and unknown GPUs (then MFU is
    not reported; give --peak-tflops to get it)."""
    if override:
        return float(override)
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    peak = lookup_peak_tflops(torch.cuda.get_device_name(device), dtype, tf32=tf32)
    return peak * 1e12 if peak else None


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------

def peak_host_mem_gb() -> float:
    """Peak resident memory of this process so far, GiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


class Throughput:
    """Accumulates per-step timings between two `summary()` calls and reports their averages.

    `update` takes global figures for one optimizer step (all ranks together): `tokens` real tokens
    (specials included, padding excluded), `samples` sequences, and `seq_len`, the longest length a
    sample may have. FLOPs are counted at each step's mean real length tokens / samples (capped at
    seq_len), so padding is not counted as useful work. Time is wall-clock per step: on GPUs it is
    only meaningful if the step ends with a synchronisation (e.g. reading the loss).
    """

    def __init__(self, model_config, objective: str = "retromae", device=None, dtype: str = "fp32",
                 world_size: int = 1, peak_tflops: float | None = None, *, fast_heads: bool = True,
                 encoder_mask_ratio: float = 0.3):
        self.model_config = model_config
        self.objective = objective
        self.device = device
        self.world_size = max(1, int(world_size))
        self.fast_heads = fast_heads
        self.encoder_mask_ratio = encoder_mask_ratio
        self.peak_flops = peak_flops_per_device(device if device is not None else "cpu", dtype,
                                                override=peak_tflops * 1e12 if peak_tflops else None)
        self._reset()

    def _reset(self) -> None:
        self.steps = 0
        self.step_time = 0.0
        self.data_wait = 0.0
        self.tokens = 0
        self.samples = 0
        self.flops = 0.0

    def flops_per_sample(self, seq_len: float) -> float:
        return retromae_flops_per_sample(self.model_config, seq_len, objective=self.objective,
                                         fast_heads=self.fast_heads, encoder_mask_ratio=self.encoder_mask_ratio)

    def update(self, *, step_time: float, data_wait: float = 0.0, tokens: int = 0, samples: int = 0,
               seq_len: int | None = None) -> None:
        length = tokens / samples if tokens and samples else (seq_len or 0)
        if seq_len:
            length = min(length, seq_len)
        self.steps += 1
        self.step_time += float(step_time)
        self.data_wait += float(data_wait)
        self.tokens += int(tokens)
        self.samples += int(samples)
        if samples and length:
            self.flops += self.flops_per_sample(length) * samples

    def summary(self) -> dict:
        """Averages since the previous summary (the window then restarts), plus peak memory so far."""
        out = {}
        if self.steps and self.step_time > 0:
            out["tokens_per_s"] = self.tokens / self.step_time
            out["samples_per_s"] = self.samples / self.step_time
            out["step_time_s"] = self.step_time / self.steps
            out["data_wait_s"] = self.data_wait / self.steps
            achieved = self.flops / self.step_time / self.world_size
            out["tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        out["peak_host_mem_gb"] = peak_host_mem_gb()
        device_mem = self._peak_device_mem_gb()
        if device_mem is not None:
            out["peak_device_mem_gb"] = device_mem
        self._reset()
        return out

    def _peak_device_mem_gb(self) -> float | None:
        import torch

        if self.device is None or torch.device(self.device).type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30


ThroughputMeter = Throughput  # the name the issue uses


# ------------------------------------------------------------------------------------------------
# --profile-steps
# ------------------------------------------------------------------------------------------------

LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                 "hipLaunchKernel", "hipExtModuleLaunchKernel")


class StepProfiler:
    """torch.profiler over the steps `first`..`last` (counted from 1) on this rank, when enabled.

    Writes to `out_dir` (OUTPUT_DIR/profile): `trace.json` (open in https://ui.perfetto.dev or
    chrome://tracing), `summary.json` and `summary.txt`. The summary is what to read first: wall time
    per step, the device's busy time per step and its share of the wall time (a low share means the
    host holds the device up), operators and kernel launches per step, and the top operators by self
    time on the host and on the device. The profiled steps are slower than others (recording costs);
    the trace is for where time goes, the metrics for how fast the run is.
    """

    def __init__(self, steps: tuple[int, int] | None, out_dir, enabled: bool = True, device=None) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.enabled = bool(steps) and enabled
        self.out_dir = Path(out_dir)
        self.device = device
        self._prof = None
        self._start = 0.0

    def before_step(self, step: int) -> None:
        """Call with the number of the step about to run."""
        if not self.enabled or step != self.first:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self._is_cuda():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()
        self._start = time.perf_counter()

    def after_step(self, step: int) -> dict | None:
        """Call with the number of the step that just ran; returns the summary after the last one."""
        if self._prof is None or step != self.last:
            return None
        import torch

        if self._is_cuda():
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._start
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        summary = self.summarize(prof.key_averages(), steps=self.last - self.first + 1, wall_s=wall)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out_dir / "summary.txt").write_text(self._table(summary))
        return summary

    def close(self) -> None:
        """The run ended before the last profiled step: stop recording, write nothing."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _is_cuda(self) -> bool:
        import torch

        return self.device is not None and torch.device(self.device).type == "cuda"

    @staticmethod
    def summarize(averages, steps: int, wall_s: float, top: int = 20) -> dict:
        """Per-step figures from `prof.key_averages()` (times in ms)."""
        def self_device_us(e) -> float:
            return float(getattr(e, "self_device_time_total", 0.0) or 0.0)

        events = list(averages)
        ops = [e for e in events if e.key.startswith("aten::")]
        device_us = sum(self_device_us(e) for e in events)
        launches = sum(e.count for e in events if e.key in LAUNCH_EVENTS)
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaEventSynchronize", "aten::_local_scalar_dense"))
        wall_ms = 1e3 * wall_s / steps

        def row(e) -> dict:
            return {"name": e.key, "calls_per_step": e.count / steps,
                    "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                    "self_device_ms_per_step": self_device_us(e) / 1e3 / steps}

        by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        by_device = sorted((e for e in events if self_device_us(e) > 0), key=self_device_us, reverse=True)[:top]
        return {"steps": steps, "wall_ms_per_step": wall_ms,
                "device_busy_ms_per_step": device_us / 1e3 / steps,
                "device_busy_share": (device_us / 1e3 / steps) / wall_ms if device_us and wall_ms else None,
                "aten_ops_per_step": sum(e.count for e in ops) / steps,
                "kernel_launches_per_step": launches / steps,
                "host_syncs_per_step": syncs / steps,
                "top_host": [row(e) for e in by_host], "top_device": [row(e) for e in by_device]}

    @staticmethod
    def _table(summary: dict) -> str:
        busy = summary["device_busy_share"]
        lines = [f"{summary['steps']} steps: {summary['wall_ms_per_step']:.2f} ms wall per step, device busy "
                 f"{summary['device_busy_ms_per_step']:.2f} ms ({'n/a' if busy is None else f'{100 * busy:.0f}%'}), "
                 f"{summary['aten_ops_per_step']:.0f} aten ops, {summary['kernel_launches_per_step']:.0f} kernel "
                 f"launches, {summary['host_syncs_per_step']:.1f} host syncs per step", ""]
        for title, key in (("top operators by self host time", "top_host"),
                           ("top operators by self device time", "top_device")):
            lines.append(f"{title} (ms per step, calls per step):")
            for r in summary[key]:
                lines.append(f"  {r['self_host_ms_per_step']:9.3f} host {r['self_device_ms_per_step']:9.3f} device "
                             f"{r['calls_per_step']:8.1f}x  {r['name'][:90]}")
            lines.append("")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# metrics.jsonl + TensorBoard
# ------------------------------------------------------------------------------------------------

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

    `resume_step`: the step this run starts from. Records of an earlier run with a larger step are
    dropped from metrics.jsonl and TensorBoard events from resume_step + 1 on are purged, so an
    interrupted-and-resumed run reads like an uninterrupted one. With enabled=False (ranks != 0)
    every method does nothing.
    """

    def __init__(self, output_dir, tensorboard_dir=None, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir else self.output_dir / "tensorboard"
        self._file = None
        self._writer = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")

        from torch.utils.tensorboard import SummaryWriter

        had_events = self.tensorboard_dir.is_dir() and any(self.tensorboard_dir.glob("events.out.tfevents.*"))
        purge = resume_step + 1 if (resume_step > 0 or had_events) else None
        self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir), purge_step=purge)

    def truncate_after(self, step: int) -> None:
        """Keep only metrics.jsonl records with step <= `step` (atomic rewrite); logging continues."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
        truncate_metrics(self.path, step)
        self._file = open(self.path, "a", encoding="utf-8")

    @staticmethod
    def tag(key: str, kind: str = "train") -> str:
        if kind == "eval":
            return f"eval/{key}"
        if kind == "train":
            return f"perf/{key}" if key in PERF_KEYS else f"train/{key}"
        return f"{kind}/{key}"

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Append {"step", "kind", **metrics} to metrics.jsonl (flushed) and write each number as a
        TensorBoard scalar. None values are left out; NaN/inf go to TensorBoard as they are and to
        the JSON file as null."""
        if not self.enabled:
            return
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


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    """Rank-0 progress: a tqdm bar (step, loss, tokens/s, ETA) when stderr is a terminal, else one
    plain line per `update` that brings metrics (i.e. every log interval), which reads well in SLURM
    logs. `plain` forces the mode (None = decide from the terminal); `file` is where output goes
    (default: stderr for the bar, stdout for plain lines). Disabled: does nothing."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *,
                 plain: bool | None = None, file=None):
        self.total = int(total_steps)
        self.initial = int(initial_step)
        self.step = self.initial
        self.enabled = enabled
        self.file = file
        self._start = time.monotonic()
        self._bar = None
        if not enabled:
            return
        if plain is None:
            plain = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
        self.plain = plain
        if not plain:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, unit="step", dynamic_ncols=True,
                             desc="train", file=file)

    def eta_seconds(self) -> float | None:
        """Remaining time at the mean step rate of this session (None before the first step)."""
        done = self.step - self.initial
        if done <= 0:
            return None
        return (time.monotonic() - self._start) / done * max(0, self.total - self.step)

    def update(self, step: int, metrics: dict | None = None) -> None:
        """Move to `step`; `metrics` (or None: nothing new to show) feeds the postfix / log line."""
        if not self.enabled:
            return
        advance = int(step) - self.step
        self.step = int(step)
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix(self._postfix(metrics), refresh=False)
            self._bar.update(advance)
        elif metrics:
            print(self.format_line(metrics), file=self.file or sys.stdout, flush=True)

    @staticmethod
    def _postfix(metrics: dict) -> dict:
        out = {}
        if metrics.get("loss") is not None:
            out["loss"] = f"{metrics['loss']:.4f}"
        if metrics.get("tokens_per_s") is not None:
            out["tok/s"] = f"{metrics['tokens_per_s']:,.0f}"
        return out

    def format_line(self, metrics: dict) -> str:
        parts = [f"step {self.step}/{self.total} ({100.0 * self.step / max(1, self.total):.1f}%)"]
        parts += [f"{k} {v}" for k, v in self._postfix(metrics).items()]
        if metrics.get("lr") is not None:
            parts.append(f"lr {metrics['lr']:.3g}")
        eta = self.eta_seconds()
        parts.append(f"elapsed {_clock(time.monotonic() - self._start)}")
        if eta is not None:
            parts.append(f"eta {_clock(eta)}")
        return "[retromae-ds] " + " | ".join(parts)

    def write(self, message: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=self.file or sys.stdout, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

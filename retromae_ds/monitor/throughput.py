"""Tokens/s, samples/s, TFLOPs per device, MFU and peak memory, averaged over each log interval.

`Throughput` counts FLOPs with the formula of `flops.retromae_flops_per_sample` and divides by the
peak of `peaks.peak_flops_per_device`; its `summary()` keys are the perf/ keys of `metrics.PERF_KEYS`.
"""

from __future__ import annotations

import resource
import sys

from retromae_ds.monitor.flops import retromae_flops_per_sample
from retromae_ds.monitor.peaks import peak_flops_per_device


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

"""--profile-steps A-B: a torch.profiler trace of a few steps on rank 0, and a summary to read first.

The summary gives host and device time per step, operators and kernel launches per step and the top
operators; see `StepProfiler`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


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

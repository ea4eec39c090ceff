"""Rank-0 progress: a tqdm bar when stderr is a terminal, plain log lines otherwise (SLURM logs)."""

from __future__ import annotations

import sys
import time


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
        if metrics.get("padding_efficiency") is not None:  # real tokens / computed positions
            out["real"] = f"{metrics['padding_efficiency']:.0%}"
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

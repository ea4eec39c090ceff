"""The engine's console lines: "[retromae-ds] ..." on standard output, from rank 0 only.

Rank 0 is read from RANK, which every launcher sets (deepspeed, torchrun, srun through
`engine.distributed.normalise_env`, which also makes a plain `python` run rank 0 of a world of one), so
`say` works before the process group exists and in code that never sees it (model loading, presets).
Errors keep their own form (one paragraph on standard error, see `errors.py` and the CLI), and so does
the Ctrl-C notice, written with os.write from inside the signal handler.
"""

from __future__ import annotations

import os

PREFIX = "[retromae-ds]"


def is_rank0() -> bool:
    """This process is rank 0 of the job (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print "[retromae-ds] message" on rank 0, flushed (other ranks print nothing)."""
    if is_rank0():
        print(f"{PREFIX} {message}", flush=True)

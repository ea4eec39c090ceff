"""Checkpoint folders, completeness and retention.

Layout: OUTPUT_DIR/checkpoints/step_00001200/
    mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's own files (any ZeRO stage)
    model_config/                                   HF config + tokenizer + retromae_config.json,
                                                    so export needs nothing but this folder
    COMPLETE                                        JSON written last, atomically, by rank 0

Why the marker: a job killed mid-save (preemption, kill -9, node loss) leaves a folder that looks
like a checkpoint. Only folders with COMPLETE are ever resumed from, exported or counted for
--keep-last; incomplete ones are deleted at the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from retromae_ds.errors import UserError

MARKER = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8,})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> bool:
    return read_marker(path) is not None


def _tagged(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _TAG.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for _, p in _tagged(checkpoint_root(output_dir)) if is_complete(p)]


def incomplete_checkpoints(output_dir: str | Path) -> list[Path]:
    return [p for _, p in _tagged(checkpoint_root(output_dir)) if not is_complete(p)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output dir meaning its newest complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such checkpoint or run folder.")
    if (p / MARKER).exists():
        if not is_complete(p):
            raise UserError(f"{path}: the checkpoint's COMPLETE marker is unreadable; pick an older checkpoint.")
        return p
    if _TAG.match(p.name):
        raise UserError(f"{path}: this checkpoint was cut off while being written (no COMPLETE marker); "
                        f"use an older one from {p.parent}.")
    found = complete_checkpoints(p)
    if not found:
        raise UserError(f"{path}: no complete checkpoint in this folder (looked for checkpoints/step_*/COMPLETE). "
                        f"Pass a run's --output-dir or one of its checkpoints/step_* folders.")
    return found[-1]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """--resume auto|none|PATH -> the checkpoint folder to load, or None to start fresh."""
    if resume in ("", "none", "no", "false"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    return find_checkpoint(resume)


def write_marker(path: Path, info: dict) -> None:
    tmp = path / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones older than them."""
    done = complete_checkpoints(output_dir)
    removed = []
    for p in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    newest = done[-1] if done else None
    for p in incomplete_checkpoints(output_dir):
        if newest is not None and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """At start-up (rank 0, before anyone saves): remove folders a killed run left half-written."""
    removed = incomplete_checkpoints(output_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed

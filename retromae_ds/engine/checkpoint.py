"""Checkpoint folders: completeness, integrity (a manifest of every file), fallback and retention.

Layout: OUTPUT_DIR/checkpoints/step_00001200/
    mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's own files (any ZeRO stage)
    model_config/                                   HF config + tokenizer + retromae_config.json,
                                                    so export needs nothing but this folder
    COMPLETE                                        JSON written last, atomically, by rank 0

Why the marker: a job killed mid-save (preemption, kill -9, node loss) leaves a folder that looks
like a checkpoint. Only folders with COMPLETE are ever resumed from, exported or counted for
--keep-last; incomplete ones are deleted at the next start.

Why the manifest inside the marker: a checkpoint can be damaged *after* it was written (a file lost in
a copy between filesystems, a node dying during a later sync, a user deleting the wrong file). The
marker lists every file with its size and an xxh3-64 checksum of its bytes, computed while the file is
written (see :class:`ManifestingCheckpointEngine`), so nothing is read twice at save time. xxh3 is a
non-cryptographic hash at ~9 GB/s on one core here (crc32 is ~2.4, blake2b ~0.5): it detects lost,
truncated and bit-flipped files, which is what storage faults produce; it is not meant to resist
tampering. `--resume auto` verifies the newest checkpoint before loading it; one that fails is renamed
`step_N.damaged` (never deleted) and the next older one is tried.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from retromae_ds.errors import UserError

MARKER = "COMPLETE"
DAMAGED_SUFFIX = ".damaged"
HASH_NAME = "xxh3_64"
_TAG = re.compile(r"^step_(\d{8,})$")
_CHUNK = 16 << 20


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def run_config(client_state: dict) -> dict:
    """The configuration a checkpoint's run ran with: the parsed flags with what the run resolved filled in
    (DeepSpeed's micro-batch and accumulation, the data's length, the demo's defaults). Checkpoints save
    the parsed flags as "config" and this resolved copy as "resolved_config"; older ones saved only
    "config", which then held the resolved values."""
    return client_state.get("resolved_config") or client_state.get("config") or {}


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / MARKER).read_text())
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


# ------------------------------------------------------------------------------------------------
# Manifest: what each file should be
# ------------------------------------------------------------------------------------------------

def _hasher():
    import xxhash

    return xxhash.xxh3_64()


def file_digest(path: Path) -> dict:
    """{"size", "xxh3_64"} of a file on disk."""
    h, size = _hasher(), 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"size": size, HASH_NAME: h.hexdigest()}


class _HashingWriter:
    """A write-only file object that hashes and counts the bytes on their way to disk.

    No `fileno` on purpose: torch's serializer would then write storages straight to the descriptor,
    past the hash."""

    def __init__(self, f):
        self._f, self.hash, self.size = f, _hasher(), 0

    def write(self, data) -> int:
        n = self._f.write(data)
        self.hash.update(data)
        self.size += len(memoryview(data).cast("B"))
        return n

    def flush(self) -> None:
        self._f.flush()


class ManifestingCheckpointEngine:
    """Wraps DeepSpeed's checkpoint engine: every file this rank saves is hashed while it is written and
    fsynced before the save returns, and a write error (disk full, quota, I/O error) is recorded instead
    of raised. Raising inside DeepSpeed's `save_checkpoint` would leave the other ranks waiting in its
    closing barrier forever; recorded, every rank reaches that barrier and the ranks then agree on
    the failure collectively (see `Checkpointer.save` in checkpointer.py)."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, dict] = {}
        self.errors: list[tuple[str, str]] = []

    def __getattr__(self, name):  # makedirs, create, commit, load, is_decoupled, ...
        return getattr(self.inner, name)

    def start(self) -> None:
        self.written, self.errors = {}, []

    def guard(self, write, what: str):
        """`write(path, ...)`, a DeepSpeed step that writes the file `what` into the folder `path` outside
        this engine (its copy of zero_to_fp32.py next to the checkpoints, on rank 0 only), with its write errors recorded
        instead of raised, for the same reason as `save`: one rank raising inside `save_checkpoint`
        leaves the others waiting in its barrier."""
        def guarded(path, *args, **kwargs):
            try:
                return write(path, *args, **kwargs)
            except OSError as err:
                self.errors.append((os.path.join(path, what), describe_write_error(err)))
        return guarded

    def save(self, state_dict, path: str) -> None:
        import torch

        _tag_bf16_optimizer_state(state_dict)
        try:
            with open(path, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(state_dict, writer,
                           _use_new_zipfile_serialization=getattr(self.inner, "zipfile_serialization", True))
                f.flush()
                os.fsync(f.fileno())
            self.written[path] = {"size": writer.size, HASH_NAME: writer.hash.hexdigest()}
        except (OSError, RuntimeError) as err:  # torch reports ENOSPC as "RuntimeError ... unexpected pos"
            self.errors.append((path, describe_write_error(err)))
            try:
                os.remove(path)  # a truncated file must not look like data
            except OSError:
                pass


def _tag_bf16_optimizer_state(state_dict) -> None:
    """Label DeepSpeed's BF16_Optimizer state as the ZeRO stage-1 partition it is.

    With bf16 weights, fp32 gradient accumulation and ZeRO stage 1, DeepSpeed 0.19.8 wraps the optimizer
    in `BF16_Optimizer` (engine `_do_optimizer_sanity_check`), whose state has no `zero_stage` key, so
    its own `zero_to_fp32` refuses the checkpoint ("... is not a zero checkpoint") although the layout is
    stage 1's: one flat fp32 partition per rank and group, aligned to 2 x world size, in
    `single_partition_of_fp32_groups`, with `partition_count`. With the key, DeepSpeed's consolidation
    (export, a resume with a new world size, the zero_to_fp32.py copied into the folder) reads it as
    stage 1; BF16_Optimizer's own loader reads its keys by name and ignores this one."""
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE

    optim = state_dict.get("optimizer_state_dict") if isinstance(state_dict, dict) else None
    if isinstance(optim, dict) and SINGLE_PARTITION_OF_FP32_GROUPS in optim and ZERO_STAGE not in optim:
        optim[ZERO_STAGE] = 1


def consolidated_fp32_state(path: Path) -> dict:
    """The full fp32 weights of a checkpoint folder (any ZeRO stage, any precision), from the optimizer's
    fp32 master partitions: what export writes and what a resume with a new world size starts from."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except ValueError as err:
        if "is not a zero checkpoint" in str(err):
            raise UserError(f"{path}: DeepSpeed cannot consolidate this checkpoint's weights ({err}). It was "
                            f"written by an earlier retromae-ds with ZeRO-1 and bf16, before its optimizer "
                            f"state was labelled; resume it with the same world size, or re-save it with "
                            f"this version.") from None
        raise
    return _with_frozen_parameters(path, state)


def _with_frozen_parameters(path: Path, state: dict) -> dict:
    """Add the frozen parameters DeepSpeed's consolidation leaves out. It records them only when gradients
    are partitioned (ZeRO >= 2), so under ZeRO-1 a frozen part (the decoder of `--objective mlm`) has no
    fp32 master anywhere; its value is the module's own copy in the model states file, which is exact:
    a frozen parameter never changes (in 16-bit runs it is the 16-bit copy the run trained beside)."""
    import torch

    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    if not files:
        return state
    saved = torch.load(str(files[0]), map_location="cpu", weights_only=False)
    if saved.get("frozen_param_shapes"):  # DeepSpeed recorded them itself (ZeRO >= 2)
        return state
    trained = {name for group in saved.get("param_shapes") or [] for name in group}
    skip = trained | set(saved.get("shared_params") or {}) | set(saved.get("buffer_names") or [])
    for key, value in (saved.get("module") or {}).items():
        if key not in state and key not in skip and isinstance(value, torch.Tensor) and value.numel():
            state[key] = value.float() if value.is_floating_point() else value
    return state


def describe_write_error(err: BaseException) -> str:
    """A few words for a failed write (torch reports a full disk as "RuntimeError ... unexpected pos")."""
    text = str(err)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if "unexpected pos" in text or "file write failed" in text:
        return "write failed (the disk is probably full)"
    return text.splitlines()[0] if text else type(err).__name__


def fsync_tree(folder: Path) -> None:
    """Flush files written by plain Python (model_config/) and the folders' entries to disk."""
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [Path(folder), *[p for p in Path(folder).rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def build_manifest(folder: Path, hashed: dict[str, dict]) -> dict[str, dict]:
    """Every file under `folder` (but the marker): entries hashed while written are taken as they are,
    the rest (small files written by Python) are read and hashed here."""
    folder = Path(folder)
    files = {}
    known = {str(Path(k).resolve()): v for k, v in hashed.items()}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in (MARKER, MARKER + ".tmp"):
            continue
        rel = p.relative_to(folder).as_posix()
        files[rel] = known.get(str(p.resolve())) or file_digest(p)
    return files


@dataclass
class Verification:
    path: Path
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked_files: int = 0
    has_manifest: bool = True

    def summary(self) -> str:
        if not self.ok:
            return "; ".join(self.problems)
        if not self.has_manifest:
            return "complete (written before manifests existed: files not checked)"
        return f"verified ({self.checked_files} files, sizes and {HASH_NAME} checksums match)"


def verify(path: Path, full: bool = True) -> Verification:
    """Check a checkpoint against its manifest: every file present, of the recorded size and (with
    `full`) the recorded checksum. `full=False` checks presence and sizes only (a stat per file), which
    is what retention uses: cheap enough to run after every save."""
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        why = "no COMPLETE marker (cut off while being written)" if not (path / MARKER).exists() \
            else "the COMPLETE marker is unreadable"
        return Verification(path, False, [f"{path / MARKER}: {why}"])
    files = marker.get("files")
    if files is None:
        return Verification(path, True, has_manifest=False)
    problems = []
    for rel, want in files.items():
        p = path / rel
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{p}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{p}: {size} bytes, the manifest says {want['size']} (truncated or replaced)")
            continue
        if full and file_digest(p)[HASH_NAME] != want[HASH_NAME]:
            problems.append(f"{p}: checksum mismatch (the bytes changed after the checkpoint was written)")
    return Verification(path, not problems, problems, checked_files=len(files))


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (never delete: the user may still rescue parts)."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
        n += 1
    path.rename(target)
    return target


# ------------------------------------------------------------------------------------------------
# Choosing what to resume from
# ------------------------------------------------------------------------------------------------

def find_checkpoint(path: str | Path, verify_files: bool = True) -> Path:
    """A checkpoint folder, or a run's output dir meaning its newest complete checkpoint. A checkpoint
    named explicitly (or the newest one of a folder) that fails verification is an error naming the bad
    file: no silent fallback when the user pointed at something."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such checkpoint or run folder.")
    if (p / MARKER).exists():
        if not is_complete(p):
            raise UserError(f"{path}: the checkpoint's COMPLETE marker is unreadable; pick an older checkpoint.")
    elif _TAG.match(p.name):
        raise UserError(f"{path}: this checkpoint was cut off while being written (no COMPLETE marker); "
                        f"use an older one from {p.parent}.")
    else:
        found = complete_checkpoints(p)
        if not found:
            raise UserError(f"{path}: no complete checkpoint in this folder (looked for checkpoints/step_*/COMPLETE). "
                            f"Pass a run's --output-dir or one of its checkpoints/step_* folders.")
        p = found[-1]
    if verify_files:
        result = verify(p)
        if not result.ok:
            raise UserError(f"{p}: this checkpoint is damaged: {result.summary()}. Pick an older checkpoint "
                            f"from {p.parent}, or restore the file.")
    return p


# The --resume values that start fresh (the flag's help says "none"; the others are accepted spellings).
NO_RESUME = ("", "none", "no", "false")


def resolve_resume(resume: str, output_dir: str | Path, warn=print) -> Path | None:
    """--resume auto|none|PATH -> the checkpoint folder to load, or None to start fresh.

    auto: the newest complete checkpoint that verifies; damaged ones are set aside (renamed
    `.damaged`) with a warning, and the next older one is tried. Run on ONE rank (rank 0): it renames
    folders. Only when checkpoints exist and none verifies is that an error."""
    if resume in NO_RESUME:
        return None
    if resume != "auto":
        return find_checkpoint(resume)
    found = complete_checkpoints(output_dir)
    failed = []
    for p in reversed(found):
        result = verify(p)
        if result.ok:
            return p
        moved = set_aside(p)
        failed.append(f"{p.name}: {result.summary()}")
        warn(f"[retromae-ds] warning: checkpoint {p} is damaged ({result.summary()}); renamed it to "
             f"{moved.name} and trying the next older checkpoint.")
    if failed:
        raise UserError(f"{checkpoint_root(output_dir)}: no checkpoint verifies, so there is nothing safe to "
                        f"resume from. Found: " + " | ".join(failed) + ". The damaged folders were renamed "
                        "*.damaged (kept). Restore the files, or start over with --resume none (or a new --output-dir).")
    return None


# ------------------------------------------------------------------------------------------------
# Writing and retention
# ------------------------------------------------------------------------------------------------

def write_marker(path: Path, info: dict) -> None:
    tmp = path / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint marker-first: a delete cut off half-way leaves an incomplete folder (removed
    at the next start), never a 'complete' one with files missing."""
    try:
        (Path(path) / MARKER).unlink()
    except FileNotFoundError:
        pass
    shutil.rmtree(path, ignore_errors=True)


# DeepSpeed (0.19.8) copies its recovery scripts beside the checkpoints at every save (rank 0)
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def remove_failed_save(path: Path) -> None:
    """Remove the partial folder of a save that failed; when it was the first save, also the copies of
    DeepSpeed's recovery scripts made beside it, so a run that never saved leaves no checkpoints/ behind."""
    remove_checkpoint(path)
    root = path.parent
    try:
        left = {entry.name for entry in root.iterdir()}
    except OSError:
        return
    if left <= set(RECOVERY_SCRIPTS):
        try:
            for name in left:
                (root / name).unlink()
            root.rmdir()
        except OSError:
            pass


def is_kept(path: Path) -> bool:
    """Marked to outlive --keep-last (`"keep": true` in its marker): wsd's decay-start checkpoint."""
    return bool((read_marker(path) or {}).get("keep"))


def prune(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` checkpoints that pass the quick check (manifest files present with
    their sizes); delete older good ones and stale incomplete ones. A checkpoint that fails the check
    does not count and is left alone (resume sets it aside), so a damaged newest checkpoint can never
    cause the last good one to be deleted. Kept checkpoints (`is_kept`) count among the newest but are
    never deleted."""
    done = complete_checkpoints(output_dir)
    good = [p for p in done if verify(p, full=False).ok]
    removed = []
    for p in good[:-keep_last] if keep_last > 0 else []:
        if is_kept(p):
            continue
        remove_checkpoint(p)
        removed.append(p)
    newest = done[-1] if done else None
    for p in incomplete_checkpoints(output_dir):
        if newest is not None and p.name < newest.name:
            remove_checkpoint(p)
            removed.append(p)
    return removed


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """At start-up (rank 0, before anyone saves): remove folders a killed run left half-written."""
    removed = incomplete_checkpoints(output_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def checkpoint_bytes(path: Path) -> int:
    """Size of a checkpoint from its manifest (or the disk when it has none)."""
    marker = read_marker(path) or {}
    if marker.get("files"):
        return sum(int(v["size"]) for v in marker["files"].values())
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())

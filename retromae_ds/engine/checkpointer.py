"""The trainer's checkpoint policy: what to resume from, how a save succeeds or fails on every rank at
once, and what a resume with another world size restores. Folder-level mechanics (markers, manifests,
verification, retention) are in `checkpoint.py`; this is the part that talks to DeepSpeed and the ranks.

What a checkpoint holds besides DeepSpeed's files and `model_config/` (the folder layout: checkpoint.py)
is the client state, saved inside DeepSpeed's model-states file and in the COMPLETE marker. It is written
by `client_state` and read through `ResumePoint`, nowhere else:

    RunState fields   step, tokens_seen, skipped_steps, loss_scale_skips, rewarm_from, first_eval,
                      new_parts_warmup (engine/state.py)
    sampler           the data position (GlobalBatchSampler.state_dict)
    config            the flags as parsed; resolved_config: as the run resolved them (checkpoint.run_config)
    data              the fingerprints of the datasets (a resume on other data is refused)
    world_size        the number of ranks that saved it (another one: a reshard)
    schedule_batch, schedule   the run's plan (engine/schedule.py RunSchedule)

Why every decision is collective: a rank that decides alone (which checkpoint to load, whether a write
failed) can load other partitions than its peers, or leave them waiting in a collective until the
process-group timeout. So rank 0 decides or gathers, and the outcome (including an error) is broadcast.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from retromae_ds.console import say
from retromae_ds.engine import checkpoint as ckpt
from retromae_ds.engine.distributed import all_gather_object, all_reduce_max, barrier, broadcast_object, on_rank0
from retromae_ds.engine.state import RunState
from retromae_ds.errors import UserError


class SaveFailed(Exception):
    """A checkpoint could not be written on some rank (disk full, quota, I/O error); every rank raises it."""

    def __init__(self, path, errors: list[tuple[str, str]]):
        super().__init__(f"{path}: {errors}")
        self.path, self.errors = path, errors


def client_state(state: RunState, sampler_state: dict, requested: dict, resolved: dict, fingerprints: list,
                 world_size: int, schedule: dict, schedule_batch: int) -> dict:
    """The client state a checkpoint saves (see the module docstring for what each key holds)."""
    return {**state.to_client_state(), "sampler": sampler_state, "config": requested, "resolved_config": resolved,
            "data": fingerprints, "world_size": world_size, "schedule_batch": schedule_batch, "schedule": schedule}


@dataclass
class ResumePoint:
    path: Path
    client: dict  # the client state saved with it (`client_state`)
    reshard: bool  # saved by another world size: weights come from the consolidated fp32 state

    @property
    def state(self) -> RunState:
        return RunState.from_client_state(self.client)

    @property
    def sampler_state(self) -> dict:
        return self.client["sampler"]

    @property
    def consumed_samples(self) -> int:
        """Samples trained on before this checkpoint (all ranks, all epochs)."""
        return int(self.client["sampler"]["total_consumed"])

    @property
    def run_config(self) -> dict:
        return ckpt.run_config(self.client)

    @property
    def world_size(self) -> int:
        return int(self.client["world_size"])

    @property
    def new_parts_warmup(self) -> dict | None:
        """The new-parts phase as saved; None in checkpoints from before the option."""
        return self.client.get("new_parts_warmup")

    @property
    def schedule_batch(self) -> int:
        """The global batch the run's schedule was defined with (older checkpoints: their own batch)."""
        if self.client.get("schedule_batch"):
            return int(self.client["schedule_batch"])
        old = ckpt.run_config(self.client)
        return int(old["micro_batch_size"]) * int(old["grad_accum"]) * int(self.client["world_size"])

    @property
    def schedule(self) -> dict | None:
        """The run's schedule as saved (RunSchedule.to_dict()); None in checkpoints from before it was saved."""
        return self.client.get("schedule")


class Checkpointer:
    """`find_resume` and `load_consolidated` before DeepSpeed starts; `attach` to the engine, then
    `begin`, `save(step, reason, client_state)`, `last_good()`."""

    def __init__(self, cfg, dist, out_dir: Path):
        self.cfg, self.dist, self.out_dir = cfg, dist, Path(out_dir)
        self.engine = self.saver = None
        self.run_facts: dict = {}
        self.write_model_files = None

    # --- before the engine exists -------------------------------------------------------------------
    def find_resume(self) -> ResumePoint | None:
        """Rank 0 resolves --resume (verifying, setting damaged checkpoints aside) and tells the others;
        each rank then checks that it sees that checkpoint. Ranks that resolved on their own could load
        different steps from a node-local or lagging --output-dir and mix ZeRO partitions."""
        cfg = self.cfg
        choice, error = None, None
        if self.dist.is_main:
            try:
                found = ckpt.resolve_resume(cfg.resume, self.out_dir)
                if found is not None:  # auto: a tag inside each rank's own --output-dir; PATH: the path
                    choice = found.name if cfg.resume == "auto" else str(found.resolve())
            except UserError as err:
                error = str(err)
        choice, error = broadcast_object((choice, error))
        if error:
            raise UserError(error)
        if choice is None:
            return None
        path = ckpt.checkpoint_root(self.out_dir) / choice if cfg.resume == "auto" else Path(choice)
        views = all_gather_object((socket.gethostname(), (path / ckpt.MARKER).is_file(), str(path.resolve())))
        blind = [f"rank {r} on {host} does not see {where}/{ckpt.MARKER}"
                 for r, (host, sees, where) in enumerate(views) if not sees]
        if blind:
            raise UserError(f"rank 0 resumes from {choice}, but " + "; ".join(blind) + ". Every rank must see the "
                            "same --output-dir: put it on a filesystem shared by all nodes.")
        marker = ckpt.read_marker(path)
        return ResumePoint(path, marker.get("client_state", {}), int(marker["world_size"]) != self.dist.world_size)

    def load_consolidated(self, model, point: ResumePoint, keep: bool) -> dict | None:
        """Rank 0 consolidates the fp32 weights of a ZeRO checkpoint and broadcasts them: one read of
        every partition instead of one per rank (at 64 ranks, 64x the I/O and host memory). A failure
        on rank 0 reaches every rank as the same error (the others would otherwise wait in the broadcast
        until the collective timeout). With `keep`, returns the consolidated state on rank 0 (None
        elsewhere) for `restore_masters`."""
        import torch
        import torch.distributed as tdist

        def consolidate() -> dict:
            state = ckpt.consolidated_fp32_state(point.path)
            model.load_state_dict(state, strict=True)
            return state

        state = on_rank0(consolidate, self.dist.is_main, lambda why: (
            f"{point.path}: consolidating the fp32 weights for a resume with a new world size failed on rank 0: {why}"))
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            with torch.no_grad():
                for tensor in model.state_dict().values():  # tied weights: the same storage twice, harmless
                    buf = tensor.to(self.dist.device)
                    tdist.broadcast(buf, src=0)
                    tensor.copy_(buf)
        return state if keep else None

    # --- with the engine ------------------------------------------------------------------------------
    def attach(self, engine, write_model_files, run_facts: dict) -> None:
        """Route DeepSpeed's writes through a hashing, error-recording engine; `write_model_files(folder)`
        adds what export needs (config, tokenizer); `run_facts` go into every marker."""
        self.engine, self.write_model_files, self.run_facts = engine, write_model_files, run_facts
        self.saver = ckpt.ManifestingCheckpointEngine(engine.checkpoint_engine)
        engine.checkpoint_engine = self.saver
        # DeepSpeed copies zero_to_fp32.py next to the checkpoints on rank 0 outside its checkpoint engine:
        # a full disk there must be recorded like any other failed write, not raised on rank 0 alone
        engine._copy_recovery_script = self.saver.guard(engine._copy_recovery_script, "zero_to_fp32.py")

    def restore_masters(self, state: dict | None) -> None:
        """Set DeepSpeed's fp32 master weights (any ZeRO stage, BF16_Optimizer too) to the consolidated
        fp32 values, one parameter at a time from rank 0 (each rank keeps its own partition). Needed after
        a resume with a new world size under bf16/fp16: DeepSpeed cast the module to 16 bits and cloned
        its masters from that, which would round every weight."""
        import torch
        import torch.distributed as tdist
        from deepspeed.utils import safe_set_full_fp32_param

        many = tdist.is_initialized() and tdist.get_world_size() > 1
        with torch.no_grad():
            for name, param in self.engine.module.named_parameters():
                shape = tuple(getattr(param, "ds_shape", param.shape))
                value = (state[name].to(self.dist.device, torch.float32).contiguous() if state is not None
                         else torch.empty(shape, dtype=torch.float32, device=self.dist.device))
                if many:
                    tdist.broadcast(value, src=0)
                safe_set_full_fp32_param(param, value)

    def begin(self, point: ResumePoint | None, fingerprints: list) -> None:
        """Clear what a killed run left half-written; then, resuming, load DeepSpeed's own state (same
        world size; a new one was loaded by `load_consolidated`) after checking it was trained on this data."""
        if self.dist.is_main:
            ckpt.remove_incomplete(self.out_dir)
        barrier()
        if point is None:
            return
        if not point.reshard:
            _, loaded = self.engine.load_checkpoint(str(point.path.parent), tag=point.path.name,
                                                    load_lr_scheduler_states=False)
            if loaded is None:
                raise UserError(f"{point.path}: DeepSpeed could not load this checkpoint.")
        self._check_compatible(point, fingerprints)

    def save(self, step: int, reason: str, client_state: dict, prune: bool = True, keep: bool = False) -> Path:
        """Every rank writes its part; the failure of any rank is everyone's (SaveFailed), the partial
        folder goes, earlier checkpoints stay. Rank 0 writes the manifest, then the marker, last. `keep`
        marks the checkpoint to outlive --keep-last (wsd's decay start; see checkpoint.prune)."""
        dist, engine, saver = self.dist, self.engine, self.saver
        path = self.path_for(step)
        if dist.is_main:
            self._warn_if_low_space()
        saver.start()
        barrier()
        engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
        errors = list(saver.errors)
        if dist.is_main and not errors:
            try:
                self.write_model_files(path / "model_config")
            except OSError as err:
                errors.append((str(path / "model_config"), ckpt.describe_write_error(err)))
        reports = all_gather_object((errors, saver.written, socket.gethostname()))
        errors = [e for errs, _, _ in reports for e in errs]
        unshared = None
        if dist.is_main and not errors:
            unshared = _unseen_files(reports, self.cfg.output_dir)
        if dist.is_main and not errors and not unshared:
            written = {k: v for _, w, _ in reports for k, v in w.items()}
            try:
                ckpt.fsync_tree(path)
                ckpt.write_marker(path, {"step": step, "world_size": dist.world_size, "reason": reason,
                                         **({"keep": True} if keep else {}), **self.run_facts,
                                         "client_state": client_state, "hash": ckpt.HASH_NAME,
                                         "files": ckpt.build_manifest(path, written)})
            except OSError as err:
                errors.append((str(path / ckpt.MARKER), ckpt.describe_write_error(err)))
        errors, unshared = broadcast_object((errors, unshared))
        if unshared or errors:
            if dist.is_main:
                ckpt.remove_failed_save(path)
            barrier()
            if unshared:
                raise UserError(unshared)
            raise SaveFailed(path, errors)
        if dist.is_main and prune:
            ckpt.prune(self.out_dir, self.cfg.keep_last)
        barrier()
        return path

    def path_for(self, step: int) -> Path:
        return ckpt.checkpoint_root(self.out_dir) / ckpt.tag_for(step)

    def weights_finite_everywhere(self) -> bool:
        """Every rank's share of the weights is finite (a collective)."""
        return not all_reduce_max([0.0 if _weights_finite(self.engine) else 1.0], self.dist.device)[0]

    def last_good(self) -> Path | None:
        good = [p for p in ckpt.complete_checkpoints(self.out_dir) if ckpt.verify(p, full=False).ok]
        return good[-1] if good else None

    def failure_message(self, failed: SaveFailed, n_params: int) -> str:
        first_file, why = failed.errors[0]
        need = self._size_estimate(n_params)
        try:
            free = shutil.disk_usage(self.out_dir).free
        except OSError:
            free = 0
        good = ckpt.complete_checkpoints(self.out_dir)
        resume = f"resume from {good[-1]}" if good else "start from the beginning (no earlier checkpoint)"
        return (f"saving the checkpoint {failed.path} failed: {why} while writing {first_file}"
                f"{f' (and {len(failed.errors) - 1} more files)' if len(failed.errors) > 1 else ''}. "
                f"The last checkpoint needed {need:,} bytes ({_gb(need)}); {free:,} bytes ({_gb(free)}) are free "
                f"on that filesystem. The partial folder was removed and earlier checkpoints are untouched. "
                f"Free space (or lower --keep-last, or use another --output-dir), then run the same command "
                f"again to {resume}.")

    # --- internals --------------------------------------------------------------------------------------
    def _check_compatible(self, point: ResumePoint, fingerprints: list) -> None:
        old = point.client.get("data")

        def same(d):  # the token count tells apart two corpora that happen to pack into as many blocks
            return d["vocab_hash"], d["num_blocks"], d.get("num_tokens")

        if old and [same(d) for d in old] != [same(d) for d in fingerprints]:
            raise UserError(f"{point.path}: this checkpoint was trained on different data "
                            f"({[d['prefix'] for d in old]}); resuming would not continue the same sample order. "
                            f"Use the same --data, or --resume none with a new --output-dir.")

    def _warn_if_low_space(self) -> None:
        """Rank 0, before each save: warn early when the next checkpoint will not fit."""
        from retromae_ds.engine.build import count_params

        need = self._size_estimate(count_params(self.engine.module))
        free = shutil.disk_usage(self.out_dir).free
        if free < need:
            say(f"warning: {self.out_dir} has {_gb(free)} free but the next checkpoint needs about "
                f"{_gb(need)}; it will probably fail. Free space or lower --keep-last now.")

    def _size_estimate(self, n_params: int) -> int:
        done = ckpt.complete_checkpoints(self.out_dir)
        # no checkpoint yet: fp32 master weights + two Adam moments + the model's own copy, 4 bytes each
        return ckpt.checkpoint_bytes(done[-1]) if done else 16 * n_params


def _unseen_files(reports: list, output_dir: str) -> str | None:
    """Rank 0's check that it sees every file each rank wrote (`reports`: per rank (errors, {path: digest},
    host)). A node-local --output-dir leaves each node's partitions on its own disk: the checkpoint
    would look complete on rank 0 and fail only at resume, and older ones would be pruned on node 0 only."""
    me = reports[0][2]
    for rank, (_, written, host) in enumerate(reports):
        for path in written:
            if not os.path.exists(path):
                return (f"--output-dir {output_dir} is not shared by all ranks: rank {rank} on {host} wrote {path}, "
                        f"which rank 0 on {me} cannot see. Every rank writes its own part of each checkpoint, so "
                        f"--output-dir must be on a filesystem all nodes share (NFS, Lustre, GPFS, ...). Nothing was "
                        f"kept of this checkpoint on {me}; delete {Path(path).parent} on {host} too.")
    return None


def _weights_finite(engine) -> bool:
    """This rank's share of the weights (module parameters and fp32 master partitions) is finite."""
    import torch

    tensors = [getattr(p, "ds_tensor", None) if getattr(p, "ds_tensor", None) is not None else p.data
               for p in engine.module.parameters()]
    opt = engine.optimizer
    # ZeRO-1/2, ZeRO-3 and BF16_Optimizer (ZeRO-1 with bf16) name their fp32 master partitions differently
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        tensors += list(getattr(opt, name, None) or [])
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


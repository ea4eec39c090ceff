"""Pre-train RetroMAE with DeepSpeed: the whole training loop, in one place.

Usage (any launcher):
  deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json            # the demo
  deepspeed --num_gpus 8 launch/pretrain.py --deepspeed ds_configs/zero2.json \\
      --data data/wiki --model bert-base-uncased-local --max-steps 100000
  torchrun --nproc-per-node 8 launch/pretrain.py ...      |      python launch/pretrain.py ...

Every flag can also come from a YAML file (--config run.yaml); the command line wins.

What makes a run exactly resumable: the data order is a function of (seed, epoch) and the number of
samples consumed; masks and dropout are seeded by (seed, step, micro-batch number); the learning
rate is a function of the step; model + optimizer state are DeepSpeed's. A checkpoint stores the step
and the sampler position, so `--resume auto` after any interruption (even kill -9) continues on the
same trajectory as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

from retromae_ds import config as config_mod
from retromae_ds.config import TrainConfig
from retromae_ds.errors import UserError

# Exit codes (besides 0 = finished or stopped cleanly on a signal / time budget, 2 = a usage or data error):
EXIT_NONFINITE = 3  # --max-nonfinite-steps consecutive NaN/inf steps
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (disk full, quota, I/O error); earlier ones are intact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = config_mod.config_from_args(args)
    return Trainer(cfg, local_rank_arg=getattr(args, "local_rank", None)).train()


def run_cli(argv: list[str] | None = None) -> int:
    """Entry for launch/pretrain.py: same flags as `retromae-ds train`, clear errors on every rank."""
    parser = argparse.ArgumentParser(prog="pretrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as err:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x ^= (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class StopRequest:
    """SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit) set a flag; the loop
    finishes the current step, saves and exits 0 so the job can be requeued."""

    def __init__(self):
        self.signal = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum


class SaveFailed(Exception):
    """A checkpoint could not be written on some rank (disk full, quota, I/O error); every rank raises it."""

    def __init__(self, path, errors: list[tuple[str, str]]):
        super().__init__(f"{path}: {errors}")
        self.path, self.errors = path, errors


class Trainer:
    def __init__(self, cfg: TrainConfig, local_rank_arg: int | None = None):
        self.cfg = cfg
        self.local_rank_arg = local_rank_arg

    # ----------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        stop = StopRequest()
        from retromae_ds.engine.distributed import (all_gather_object, all_reduce_max, all_reduce_sum, barrier,
                                                    broadcast_object, init_distributed, native_bf16)

        dist = init_distributed(self.local_rank_arg, timeout=config_mod.parse_dist_timeout(cfg.dist_timeout))
        self.dist = dist
        if cfg.is_demo:
            from retromae_ds.engine.build import apply_demo_defaults, ensure_demo_data

            apply_demo_defaults(cfg)
            ensure_demo_data(cfg, dist.is_main)
            barrier()

        import deepspeed
        import numpy as np
        import torch

        from retromae_ds.data.loader import MicroBatchLoader
        from retromae_ds.data.masking import MaskGenerator, continuation_table, mask_rng, word_break_table
        from retromae_ds.data.sampler import GlobalBatchSampler
        from retromae_ds.engine import checkpoint as ckpt
        from retromae_ds.engine.build import (build_model, count_params, load_data, load_tokenizer, param_groups,
                                              resolve_max_seq_len, write_model_files)
        from retromae_ds.engine.schedule import lr_at, plan_schedule
        from retromae_ds.monitor import MetricsLogger, ProgressBar, StepProfiler, Throughput

        out_dir = Path(cfg.output_dir)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

        # --- data, tokenizer, model -------------------------------------------------------------
        tokenizer = load_tokenizer(cfg)
        data = load_data(cfg, tokenizer)
        model = build_model(cfg, tokenizer)
        cfg.max_seq_len = resolve_max_seq_len(cfg, data.meta, model.lm.config)
        from retromae_ds.model.positions import token_positions

        # evaluation texts are cut to what the position table holds (a 128-position model and the
        # default --eval-max-length 256 would otherwise fail at the end of training)
        self.eval_max_length = min(cfg.eval_max_length, token_positions(model.lm) or cfg.eval_max_length)
        block_cap = cfg.max_seq_len - 2
        n_train = getattr(data.train, "samples_per_epoch", len(data.train))  # a blend's epoch: its weighted shares
        world = dist.world_size

        # --- DeepSpeed ------------------------------------------------------------------------------
        capability = torch.cuda.get_device_capability(dist.device) if dist.device_type == "cuda" else None
        precision = config_mod.resolve_precision(cfg, dist.device_type, native_bf16(dist.device_type, capability))
        ds_config = config_mod.resolve_deepspeed_config(
            config_mod.load_deepspeed_json(cfg.deepspeed), cfg, world_size=world, precision=precision,
            source=f"--deepspeed {cfg.deepspeed}")
        global_batch = cfg.micro_batch_size * cfg.grad_accum * world  # after the JSON may have set them
        if cfg.compile:
            if ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
                raise UserError(f"--compile with ZeRO-3 ({cfg.deepspeed}): ZeRO-3 gathers each layer's parameters in "
                                f"hooks around its call, which compiled layers do not run through. Use ZeRO-1 or "
                                f"ZeRO-2 (--deepspeed zero1 / zero2) with --compile, or drop --compile.")
            compiled = model.compile_layers()
            if dist.is_main:
                print(f"[retromae-ds] --compile: {compiled} layers compiled with torch.compile; the first step "
                      f"builds their kernels (minutes for big models), later steps reuse them.", flush=True)

        # --- what to resume from: rank 0 decides (and sets damaged checkpoints aside), all follow ----
        resume_from = self._agree_on_resume(out_dir, broadcast_object, all_gather_object)
        resume_info = ckpt.read_marker(resume_from) if resume_from else None
        client = resume_info["client_state"] if resume_info else {}
        reshard = bool(resume_info) and int(resume_info["world_size"]) != world
        sched = plan_schedule(max_steps=cfg.max_steps, epochs=cfg.epochs, warmup=cfg.warmup, num_samples=n_train,
                              batch=_schedule_batch(client) or global_batch)
        if sched.total_steps <= 0:
            raise UserError("nothing to train: give --max-steps N or --epochs E (> 0).")
        consolidated = None
        if reshard:
            # ZeRO partitions are per-rank: with a new world size, start from the consolidated fp32
            # weights (read once, by rank 0, then broadcast); Adam moments restart.
            consolidated = self._load_consolidated_weights(model, resume_from, keep=precision != "fp32")

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.weight_decay),
                                               config=ds_config)
        if reshard and precision != "fp32":
            # DeepSpeed cast the module to 16 bits and cloned its fp32 masters from that: put the exact
            # consolidated values back, or every resume with a new world size would round the weights.
            self._restore_fp32_masters(engine, consolidated)
        del consolidated
        saver = ckpt.ManifestingCheckpointEngine(engine.checkpoint_engine)
        engine.checkpoint_engine = saver
        # DeepSpeed copies zero_to_fp32.py into each checkpoint on rank 0 outside its checkpoint engine:
        # a full disk there must be recorded like any other failed write, not raised on rank 0 alone
        engine._copy_recovery_script = saver.guard(engine._copy_recovery_script, "zero_to_fp32.py")
        device = engine.device
        pad_id = tokenizer.pad_token_id
        masker = MaskGenerator(continuation_table(tokenizer), cls_id=tokenizer.cls_token_id,
                               sep_id=tokenizer.sep_token_id, pad_id=pad_id, mask_id=tokenizer.mask_token_id,
                               vocab_size=len(tokenizer), special_ids=list(tokenizer.all_special_ids),
                               encoder_mask_ratio=cfg.encoder_mask_ratio,
                               decoder_mask_ratio=cfg.decoder_mask_ratio,
                               decoder_mask_pool=cfg.decoder_mask_pool,
                               word_breaks=word_break_table(tokenizer)).to(device)
        sampler = GlobalBatchSampler.for_dataset(data.train, seed=cfg.seed)
        loader = MicroBatchLoader(data.train, masker, pad_id, block_cap, cfg.micro_batch_size, world, dist.rank,
                                  cfg.grad_accum, pin=device.type == "cuda", static_width=cfg.compile or cfg.static_shapes)
        ahead = None  # the next step's micro-batches, loading

        step, skipped_total, scale_skips, tokens_seen, rewarm_from = 0, 0, 0, 0, None
        if dist.is_main:
            ckpt.remove_incomplete(out_dir)
        barrier()
        if resume_from is not None:
            if not reshard:
                _, loaded = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name,
                                                   load_lr_scheduler_states=False)
                if loaded is None:
                    raise UserError(f"{resume_from}: DeepSpeed could not load this checkpoint.")
            self._check_resume_compatible(client, data.fingerprints, resume_from)
            step = int(client["step"])
            skipped_total = int(client["skipped_steps"])
            scale_skips = int(client.get("loss_scale_skips", 0))
            tokens_seen = int(client["tokens_seen"])
            rewarm_from = step if reshard else client.get("rewarm_from")
            sampler.load_state_dict(client["sampler"])
            if dist.is_main:
                note = (f" (new world size: weights restored, optimizer moments reset, LR re-warmed over "
                        f"{sched.rewarm_steps()} steps)") if reshard else ""
                print(f"[retromae-ds] resumed from {resume_from} at step {step}{note}", flush=True)

        def steps_left() -> int:
            return max(0, math.ceil((sched.end_samples - sampler.total_consumed) / global_batch))

        total_steps = step + steps_left()
        logger = MetricsLogger(out_dir, cfg.tensorboard_dir or None, enabled=dist.is_main, resume_step=step)
        meter = Throughput(model_config=model.lm.config, objective=cfg.objective, device=device,
                           dtype=precision, world_size=world, peak_tflops=cfg.peak_tflops or None)
        bar = ProgressBar(total_steps, initial_step=step, enabled=dist.is_main)
        profiler = StepProfiler(config_mod.parse_profile_steps(cfg.profile_steps), out_dir / "profile",
                                enabled=dist.is_main, device=device)
        if dist.is_main and step == 0:
            self._print_banner(model, ds_config, total_steps, global_batch, n_train, precision, world)
        run_facts = {"precision": precision, "zero_stage": engine.zero_optimization_stage(),
                     "grad_accum_dtype": str(engine.get_data_types()[1]).replace("torch.", ""),
                     "communication_dtype": str(engine.communication_data_type).replace("torch.", ""),
                     "optimizer": type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                                       else engine.optimizer).__name__,
                     "activation_checkpointing": bool(model.is_gradient_checkpointing and _encoder_recomputes(model.lm))}

        def save(tag_step: int, reason: str, prune: bool = True) -> Path:
            """Every rank writes its part; the failure of any rank is everyone's (SaveFailed), the partial
            folder goes, earlier checkpoints stay. Rank 0 writes the manifest, then the marker, last."""
            path = ckpt.checkpoint_root(out_dir) / ckpt.tag_for(tag_step)
            client_state = {"step": tag_step, "skipped_steps": skipped_total, "loss_scale_skips": scale_skips,
                            "tokens_seen": tokens_seen,
                            "sampler": sampler.state_dict(), "config": cfg.to_dict(),
                            "data": data.fingerprints, "world_size": world, "schedule_batch": sched.batch,
                            "rewarm_from": rewarm_from}
            if dist.is_main:
                self._warn_if_low_space(out_dir, count_params(model))
            saver.start()
            barrier()
            engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
            errors = list(saver.errors)
            if dist.is_main and not errors:
                try:
                    write_model_files(engine.module, tokenizer, cfg, path / "model_config")
                except OSError as err:
                    errors.append((str(path / "model_config"), ckpt.describe_write_error(err)))
            reports = all_gather_object((errors, saver.written, socket.gethostname()))
            errors = [e for errs, _, _ in reports for e in errs]
            unshared = None
            if dist.is_main and not errors:
                unshared = _unseen_files(reports, cfg.output_dir)
            if dist.is_main and not errors and not unshared:
                written = {k: v for _, w, _ in reports for k, v in w.items()}
                try:
                    ckpt.fsync_tree(path)
                    ckpt.write_marker(path, {"step": tag_step, "world_size": world, "reason": reason, **run_facts,
                                             "client_state": client_state, "hash": ckpt.HASH_NAME,
                                             "files": ckpt.build_manifest(path, written)})
                except OSError as err:
                    errors.append((str(path / ckpt.MARKER), ckpt.describe_write_error(err)))
            errors, unshared = broadcast_object((errors, unshared))
            if unshared:
                if dist.is_main:
                    ckpt.remove_checkpoint(path)
                barrier()
                raise UserError(unshared)
            if errors:
                if dist.is_main:
                    ckpt.remove_checkpoint(path)
                barrier()
                raise SaveFailed(path, errors)
            if dist.is_main and prune:
                ckpt.prune(out_dir, cfg.keep_last)
            barrier()
            return path

        def evaluate() -> dict:
            return self._evaluate(engine.module, tokenizer, data.heldout, device)

        def host_flags() -> list[float]:
            """This rank's [got a signal, out of time]."""
            return [float(stop.signal != 0), float(budget is not None and time.monotonic() - start > budget)]

        def stop_flags() -> tuple[bool, bool]:
            """(signal, out of time), agreed by all ranks: one rank's SIGTERM stops everyone."""
            got, late = all_reduce_max(host_flags(), device)
            return bool(got), bool(late)

        # --- the loop -------------------------------------------------------------------------------
        budget = config_mod.parse_time_budget(cfg.time_budget)
        start = time.monotonic()
        consecutive_bad = 0
        bad_run = torch.zeros((), dtype=torch.int64, device=device)  # NaN/inf steps in a row, so far
        bad_new = torch.zeros((), dtype=torch.int64, device=device)  # NaN/inf steps since the last check
        last_saved = step if resume_from is not None else -1
        exit_code, reason = 0, "finished"
        loss_sum = torch.zeros(4, dtype=torch.float64, device=device)  # loss, enc, dec, bow (local sums)
        acc_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_micro = 0
        if cfg.eval_interval and step == 0:
            logger.log(0, evaluate(), kind="eval")  # the starting point, to compare against
        engine.train()
        try:
            while steps_left() > 0:
                profiler.before_step(step + 1)
                t0 = time.monotonic()
                lr = lr_at(sched.position(sampler.total_consumed), peak_lr=cfg.lr, total_steps=sched.total_steps,
                           warmup=sched.warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
                if rewarm_from is not None and sched.rewarm_steps():
                    lr *= min(1.0, (step - rewarm_from + 1) / sched.rewarm_steps())
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr
                if ahead is None:  # the first step (later ones were submitted one step early)
                    ahead = loader.submit(sampler.peek_global_batch(global_batch))
                batch_idx, ready = sampler.next_global_batch(global_batch), ahead
                # the next step's blocks load on the loader's thread while this step runs on the device
                ahead = loader.submit(sampler.peek_global_batch(global_batch)) if steps_left() > 0 else None
                step_tokens = int((np.minimum(data.train_sizes[batch_idx], block_cap) + 2).sum(dtype=np.int64))
                t_data = time.monotonic()
                micro_batches = ready.result()
                data_wait = time.monotonic() - t_data
                nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any micro-batch's loss
                searching = _loss_scale_can_fall(engine)  # before the step: the step may lower it
                for k, micro in enumerate(micro_batches):
                    micro_no = k * world + dist.rank
                    batch = masker(*micro.to(device), mask_rng(cfg.seed, step, micro_no, device), plan=micro.plan)
                    torch.manual_seed(mix_seed(cfg.seed, step, micro_no, 1))  # dropout: same for any resume
                    out = engine(**batch)
                    loss = out.loss
                    if step in cfg.inject_nonfinite_steps and cfg.inject_nonfinite_micro in (-1, k):
                        loss = loss * float("nan")
                    nonfinite |= ~torch.isfinite(loss.detach())
                    engine.backward(loss)
                    engine.step()
                    with torch.no_grad():
                        parts = [out.loss, out.encoder_loss,
                                 out.decoder_loss if out.decoder_loss is not None else out.loss.new_zeros(()),
                                 out.bow_loss if out.bow_loss is not None else out.loss.new_zeros(())]
                        loss_sum += torch.stack([p.detach().double() for p in parts])
                        if out.encoder_accuracy is not None:
                            acc_sum += out.encoder_accuracy.detach().double()
                    n_micro += 1
                step += 1
                tokens_seen += step_tokens
                # bookkeeping stays on the device: reading a flag every step would drain the GPU queue
                skipped = not engine.was_step_applied()  # a host flag (DeepSpeed has synced for it already)
                if skipped and searching and not bool(nonfinite):
                    # fp16's dynamic loss scale overflowed and DeepSpeed lowers it: its normal search for a
                    # scale that fits, not a fault (a non-finite loss still is one)
                    scale_skips += 1
                    skipped = False
                bad_step = nonfinite | skipped
                bad_run = (bad_run + 1) * bad_step
                bad_new += bad_step
                finished = steps_left() == 0
                eval_now = bool(cfg.eval_interval) and step % cfg.eval_interval == 0 and not finished
                save_now = bool(cfg.save_interval) and step % cfg.save_interval == 0 and not finished
                got_signal = out_of_time = False
                if step % cfg.log_interval == 0 or finished or eval_now or save_now:
                    # The step's one host-device sync, every --log-interval steps (and before a save or
                    # an evaluation): all ranks agree on signals, the time budget and NaN/inf steps. So a
                    # stop request or the --max-nonfinite-steps limit acts up to --log-interval steps late;
                    # the checkpoint is still exact. DeepSpeed skips a bad step on every rank at once, so
                    # the ranks' counts agree and MAX merges them.
                    flags = torch.tensor(host_flags(), dtype=torch.float64)
                    got_signal, out_of_time, run_max, new_max = (all_reduce_max(torch.cat(
                        [flags.to(device), torch.stack([bad_run, bad_new]).to(torch.float64)]), device))
                    got_signal, out_of_time = bool(got_signal), bool(out_of_time)
                    consecutive_bad = int(run_max)
                    skipped_total += int(new_max)
                    bad_new.zero_()
                # after the sync: the step that syncs also counts the device work the steps before it queued
                meter.update(step_time=time.monotonic() - t0, data_wait=data_wait, tokens=step_tokens,
                             samples=global_batch, seq_len=cfg.max_seq_len)
                profiler.after_step(step)

                if step % cfg.log_interval == 0 or finished:
                    sums = all_reduce_sum(torch.cat([loss_sum, acc_sum[None], loss_sum.new_tensor([n_micro])]), device)
                    count = max(1.0, sums[-1])
                    metrics = {"loss": sums[0] / count, "encoder_loss": sums[1] / count,
                               "decoder_loss": sums[2] / count, "encoder_accuracy": sums[4] / count,
                               "lr": lr, "grad_norm": _grad_norm(engine), "skipped_steps": skipped_total,
                               "loss_scale_skips": scale_skips,
                               "tokens_seen": tokens_seen, "samples_seen": sampler.total_consumed,
                               "epoch": sampler.epoch}
                    if cfg.objective == "mlm":
                        metrics["decoder_loss"] = float("nan")  # no decoder: null in metrics.jsonl
                    if cfg.objective == "dupmae":
                        metrics["bow_loss"] = sums[3] / count
                    if precision == "fp16":
                        metrics["loss_scale"] = float(getattr(engine.optimizer, "cur_scale",
                                                              getattr(engine.optimizer, "loss_scale", 0.0)))
                    metrics.update(meter.summary())
                    logger.log(step, metrics)
                    bar.update(step, metrics)
                    loss_sum.zero_()
                    acc_sum.zero_()
                    n_micro = 0
                else:
                    bar.update(step, None)

                if consecutive_bad >= cfg.max_nonfinite_steps:
                    exit_code, reason = EXIT_NONFINITE, "non-finite"
                    break
                paused = False  # an evaluation or save ran: a signal may have arrived meanwhile
                if eval_now:
                    logger.log(step, evaluate(), kind="eval")
                    paused = True
                if save_now:
                    # during a run of NaN/inf steps: save only finite weights, and prune nothing, so the
                    # checkpoint from before the trouble survives whatever DeepSpeed did with the gradients
                    if consecutive_bad == 0 or not all_reduce_max([float(not _weights_finite(engine))], device)[0]:
                        save(step, "interval", prune=consecutive_bad == 0)
                        last_saved = step
                    if step == cfg.inject_signal_at_save:
                        os.kill(os.getpid(), signal.SIGTERM)
                    paused = True
                if paused and not (got_signal or out_of_time):
                    got_signal, out_of_time = stop_flags()
                if got_signal or out_of_time:
                    reason = "signal" if got_signal else "time-budget"
                    break

            # --- the end ------------------------------------------------------------------------------
            bar.close()
            if exit_code == EXIT_NONFINITE:
                return self._stop_nonfinite(engine, save, step, consecutive_bad, out_dir, last_saved, logger,
                                            device, all_reduce_max)
            path = save(step, reason) if last_saved != step else ckpt.checkpoint_root(out_dir) / ckpt.tag_for(step)
        except SaveFailed as failed:
            bar.close()
            logger.close()
            if dist.is_main:
                print(f"pretrain: error: {self._save_failure_message(failed, out_dir, count_params(model))}",
                      file=sys.stderr, flush=True)
            return EXIT_SAVE_FAILED
        finally:
            loader.close()
            profiler.close()
        if reason in ("signal", "time-budget"):
            if dist.is_main:
                print(f"[retromae-ds] stopped on {reason} at step {step}/{total_steps}; checkpoint {path}. "
                      f"Run the same command again (with --resume auto) to continue.", flush=True)
            logger.close()
            return 0
        final = self._evaluate(engine.module, tokenizer, data.heldout, device)
        logger.log(step, final, kind="eval")
        if cfg.export:
            barrier()
            error = None
            if dist.is_main:
                from retromae_ds.engine.export import export_checkpoint

                try:
                    target = export_checkpoint(path, out_dir / "export", overwrite=True)
                    print(f"[retromae-ds] exported the encoder to {target}", flush=True)
                except Exception as err:  # noqa: BLE001 - the other ranks wait for rank 0's outcome
                    error = f"{err}" if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            error = broadcast_object(error)  # also the barrier after the export
            if error:
                raise UserError(f"exporting {path} to {out_dir / 'export'} failed on rank 0: {error}. Training "
                                f"finished and the checkpoint is complete: run `retromae-ds export {path} OUT_DIR` "
                                f"once the cause is fixed.")
        if dist.is_main:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float))
            searched = f", {scale_skips} loss-scale skips (fp16)" if precision == "fp16" else ""
            print(f"[retromae-ds] done: {step} steps, {skipped_total} skipped as NaN/inf{searched}. {shown}",
                  flush=True)
        logger.close()
        return 0

    # ----------------------------------------------------------------------------------------------
    def _agree_on_resume(self, out_dir: Path, broadcast_object, all_gather_object) -> Path | None:
        """Rank 0 resolves --resume (verifying, setting damaged checkpoints aside) and tells the others;
        each rank then checks that it sees that checkpoint. Ranks that resolved on their own could load
        different steps from a node-local or lagging --output-dir and mix ZeRO partitions."""
        from retromae_ds.engine import checkpoint as ckpt

        cfg = self.cfg
        choice, error = None, None
        if self.dist.is_main:
            try:
                found = ckpt.resolve_resume(cfg.resume, out_dir)
                if found is not None:  # auto: a tag inside each rank's own --output-dir; PATH: the path
                    choice = found.name if cfg.resume == "auto" else str(found.resolve())
            except UserError as err:
                error = str(err)
        choice, error = broadcast_object((choice, error))
        if error:
            raise UserError(error)
        if choice is None:
            return None
        path = ckpt.checkpoint_root(out_dir) / choice if cfg.resume == "auto" else Path(choice)
        views = all_gather_object((socket.gethostname(), (path / ckpt.MARKER).is_file(), str(path.resolve())))
        blind = [f"rank {r} on {host} does not see {where}/{ckpt.MARKER}"
                 for r, (host, sees, where) in enumerate(views) if not sees]
        if blind:
            raise UserError(f"rank 0 resumes from {choice}, but " + "; ".join(blind) + ". Every rank must see the "
                            f"same --output-dir: put it on a filesystem shared by all nodes.")
        return path

    def _load_consolidated_weights(self, model, checkpoint: Path, keep: bool) -> dict | None:
        """Rank 0 consolidates the fp32 weights of a ZeRO checkpoint and broadcasts them: one read of
        every partition instead of one per rank (at 64 ranks, 64x the I/O and host memory). A failure
        on rank 0 reaches every rank as the same error (the others would otherwise wait in the broadcast
        until the collective timeout). With `keep`, returns the consolidated state on rank 0 (None
        elsewhere) for `_restore_fp32_masters`."""
        import torch
        import torch.distributed as tdist

        from retromae_ds.engine import checkpoint as ckpt
        from retromae_ds.engine.distributed import broadcast_object

        state, error = None, None
        if self.dist.is_main:
            try:
                state = ckpt.consolidated_fp32_state(checkpoint)
                model.load_state_dict(state, strict=True)
            except Exception as err:  # noqa: BLE001 - any failure must reach the other ranks
                error = f"{err}" if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        error = broadcast_object(error)
        if error:
            raise UserError(f"{checkpoint}: consolidating the fp32 weights for a resume with a new world size "
                            f"failed on rank 0: {error}")
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            with torch.no_grad():
                for tensor in model.state_dict().values():  # tied weights: the same storage twice, harmless
                    buf = tensor.to(self.dist.device)
                    tdist.broadcast(buf, src=0)
                    tensor.copy_(buf)
        return state if keep else None

    def _restore_fp32_masters(self, engine, state: dict | None) -> None:
        """Set DeepSpeed's fp32 master weights (any ZeRO stage, BF16_Optimizer too) to the consolidated
        fp32 values, one parameter at a time from rank 0 (each rank keeps its own partition)."""
        import torch
        import torch.distributed as tdist
        from deepspeed.utils import safe_set_full_fp32_param

        many = tdist.is_initialized() and tdist.get_world_size() > 1
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                shape = tuple(getattr(param, "ds_shape", param.shape))
                value = (state[name].to(self.dist.device, torch.float32).contiguous() if state is not None
                         else torch.empty(shape, dtype=torch.float32, device=self.dist.device))
                if many:
                    tdist.broadcast(value, src=0)
                safe_set_full_fp32_param(param, value)

    def _stop_nonfinite(self, engine, save, step, consecutive_bad, out_dir, last_saved, logger, device,
                        all_reduce_max) -> int:
        """Too many NaN/inf steps in a row. Skipped steps leave the weights as they were, but a DeepSpeed
        that applied a bad gradient would not: save only weights that are finite everywhere, and never
        prune at this exit, so the last good checkpoint survives whatever happened."""
        from retromae_ds.engine import checkpoint as ckpt

        finite = not all_reduce_max([0.0 if _weights_finite(engine) else 1.0], device)[0]
        if finite and last_saved != step:
            path = save(step, "non-finite", prune=False)
            held = f"The checkpoint {path} holds the weights after the last good step (skipped steps do not change them)."
        else:
            good = [p for p in ckpt.complete_checkpoints(out_dir) if ckpt.verify(p, full=False).ok]
            where = good[-1] if good else None
            held = ("The weights are no longer finite, so nothing was saved; " if not finite else "") + \
                (f"the last good checkpoint is {where}." if where else "there is no earlier checkpoint.")
        if self.dist.is_main:
            print(f"pretrain: error: {consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                  f"(last at step {step}); stopped. {held} Lower --lr, raise --warmup, use --precision bf16 "
                  f"instead of fp16, or check the data.", file=sys.stderr, flush=True)
        logger.close()
        return EXIT_NONFINITE

    def _warn_if_low_space(self, out_dir: Path, n_params: int) -> None:
        """Rank 0, before each save: warn early when the next checkpoint will not fit."""
        import shutil

        need = self._checkpoint_size_estimate(out_dir, n_params)
        free = shutil.disk_usage(out_dir).free
        if free < need:
            print(f"[retromae-ds] warning: {out_dir} has {_gb(free)} free but the next checkpoint needs about "
                  f"{_gb(need)}; it will probably fail. Free space or lower --keep-last now.", flush=True)

    @staticmethod
    def _checkpoint_size_estimate(out_dir: Path, n_params: int) -> int:
        from retromae_ds.engine import checkpoint as ckpt

        done = ckpt.complete_checkpoints(out_dir)
        # no checkpoint yet: fp32 master weights + two Adam moments + the model's own copy, 4 bytes each
        return ckpt.checkpoint_bytes(done[-1]) if done else 16 * n_params

    def _save_failure_message(self, failed: SaveFailed, out_dir: Path, n_params: int) -> str:
        import shutil

        from retromae_ds.engine import checkpoint as ckpt

        first_file, why = failed.errors[0]
        need = self._checkpoint_size_estimate(out_dir, n_params)
        try:
            free = shutil.disk_usage(out_dir).free
        except OSError:
            free = 0
        good = ckpt.complete_checkpoints(out_dir)
        resume = f"resume from {good[-1]}" if good else "start from the beginning (no earlier checkpoint)"
        return (f"saving the checkpoint {failed.path} failed: {why} while writing {first_file}"
                f"{f' (and {len(failed.errors) - 1} more files)' if len(failed.errors) > 1 else ''}. "
                f"The last checkpoint needed {need:,} bytes ({_gb(need)}); {free:,} bytes ({_gb(free)}) are free "
                f"on that filesystem. The partial folder was removed and earlier checkpoints are untouched. "
                f"Free space (or lower --keep-last, or use another --output-dir), then run the same command "
                f"again to {resume}.")

    # ----------------------------------------------------------------------------------------------
    def _evaluate(self, module, tokenizer, heldout, device) -> dict:
        """Lee similarity + held-out retrieval of the [CLS] embedding. Runs on every rank (ZeRO-3
        gathers parameters collectively); results are identical, rank 0 logs them."""
        from retromae_ds.evaluate import heldout_retrieval, lee_similarity

        cfg = self.cfg
        results = {}
        try:
            results.update(lee_similarity(module.encoder, tokenizer, max_length=self.eval_max_length, device=device))
        except UserError as err:  # gensim not installed: retrieval eval still runs
            if self.dist.is_main:
                print(f"[retromae-ds] Lee evaluation skipped: {err}", flush=True)
        if heldout:
            results.update(heldout_retrieval(module.encoder, heldout, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                             tokenizer.pad_token_id, seed=cfg.seed, max_length=self.eval_max_length,
                                             device=device))
        return results

    def _check_resume_compatible(self, client: dict, fingerprints: list, path) -> None:
        old = client.get("data")

        def same(d):  # the token count tells apart two corpora that happen to pack into as many blocks
            return d["vocab_hash"], d["num_blocks"], d.get("num_tokens")

        if old and [same(d) for d in old] != [same(d) for d in fingerprints]:
            raise UserError(f"{path}: this checkpoint was trained on different data "
                            f"({[d['prefix'] for d in old]}); resuming would not continue the same sample order. "
                            f"Use the same --data, or --resume none with a new --output-dir.")

    def _print_banner(self, model, ds_config, total_steps, global_batch, n_train, precision, world) -> None:
        from retromae_ds.engine.build import count_params

        cfg = self.cfg
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        print(f"[retromae-ds] {cfg.objective} | {count_params(model) / 1e6:.1f}M params | ZeRO-{stage} {precision} | "
              f"world {world} x micro {cfg.micro_batch_size} x accum {cfg.grad_accum} = {global_batch}/step | "
              f"{total_steps} steps = {total_steps * global_batch / n_train:.2f} epochs of {n_train} blocks | "
              f"L={cfg.max_seq_len} | out {cfg.output_dir}", flush=True)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    try:
        return float(norm) if norm is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _schedule_batch(client: dict) -> int | None:
    """The global batch a resumed run's schedule was defined with (older checkpoints: their own batch)."""
    if not client:
        return None
    if client.get("schedule_batch"):
        return int(client["schedule_batch"])
    old = client.get("config", {})
    return int(old["micro_batch_size"]) * int(old["grad_accum"]) * int(client["world_size"])


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


def _loss_scale_can_fall(engine) -> bool:
    """fp16 with a dynamic loss scale above its minimum: an overflow now makes DeepSpeed skip the step and
    lower the scale (after `hysteresis` overflows), which is how it finds a scale that fits. At the
    minimum (or with a static scale, or bf16/fp32) a skipped step means gradients no scale makes finite."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not engine.fp16_enabled() or not getattr(scaler, "dynamic", False):
        return False
    return float(scaler.cur_scale) > float(scaler.min_scale)


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


def _encoder_recomputes(lm) -> bool:
    """The HF encoder's own activation-checkpointing flag (transformers 5 renamed it; reading the old
    name prints a deprecation warning on every rank)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(lm), name, None), property):
            return bool(getattr(lm, name))
    return True


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


if __name__ == "__main__":  # python -m retromae_ds.engine.trainer: the entry outside a clone (no launch/)
    sys.exit(run_cli())

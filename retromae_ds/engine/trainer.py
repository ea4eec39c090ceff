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
import sys
import time
from pathlib import Path

from retromae_ds import config as config_mod
from retromae_ds.config import TrainConfig
from retromae_ds.errors import UserError

EXIT_NONFINITE = 3


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


class Trainer:
    def __init__(self, cfg: TrainConfig, local_rank_arg: int | None = None):
        self.cfg = cfg
        self.local_rank_arg = local_rank_arg

    # ----------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        stop = StopRequest()
        from retromae_ds.engine.distributed import all_reduce_max, all_reduce_sum, barrier, init_distributed

        dist = init_distributed(self.local_rank_arg)
        self.dist = dist
        if cfg.is_demo:
            from retromae_ds.engine.build import apply_demo_defaults, ensure_demo_data

            apply_demo_defaults(cfg)
            ensure_demo_data(cfg, dist.is_main)
            barrier()

        import deepspeed
        import numpy as np
        import torch

        from retromae_ds.data.masking import MaskGenerator, collate_blocks, continuation_table, mask_rng
        from retromae_ds.data.sampler import GlobalBatchSampler, micro_batch_indices
        from retromae_ds.engine import checkpoint as ckpt
        from retromae_ds.engine.build import (build_model, load_data, load_tokenizer, param_groups,
                                              resolve_max_seq_len, write_model_files)
        from retromae_ds.engine.schedule import lr_at, warmup_steps
        from retromae_ds.monitor import MetricsLogger, ProgressBar, Throughput

        out_dir = Path(cfg.output_dir)
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)

        # --- data, tokenizer, model -------------------------------------------------------------
        tokenizer = load_tokenizer(cfg)
        data = load_data(cfg, tokenizer)
        model = build_model(cfg, tokenizer)
        cfg.max_seq_len = resolve_max_seq_len(cfg, data.meta, model.lm.config)
        block_cap = cfg.max_seq_len - 2
        n_train = len(data.train)
        world = dist.world_size

        # --- DeepSpeed ------------------------------------------------------------------------------
        bf16_ok = dist.device_type == "cuda" and torch.cuda.is_bf16_supported()
        precision = config_mod.resolve_precision(cfg, dist.device_type, bf16_ok)
        ds_config = config_mod.resolve_deepspeed_config(
            config_mod.load_deepspeed_json(cfg.deepspeed), cfg, world_size=world, precision=precision,
            source=f"--deepspeed {cfg.deepspeed}")
        global_batch = cfg.micro_batch_size * cfg.grad_accum * world  # after the JSON may have set them

        total_steps = cfg.max_steps or math.ceil(cfg.epochs * n_train / global_batch)
        if total_steps <= 0:
            raise UserError("nothing to train: give --max-steps N or --epochs E (> 0).")
        warmup = warmup_steps(cfg.warmup, total_steps)

        resume_from = ckpt.resolve_resume(cfg.resume, out_dir)
        resume_info = ckpt.read_marker(resume_from) if resume_from else None
        reshard = bool(resume_info) and int(resume_info["world_size"]) != world
        if reshard:
            # ZeRO partitions are per-rank: with a new world size, start from the consolidated fp32
            # weights; Adam moments restart. The data position carries over exactly.
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(resume_from.parent), tag=resume_from.name)
            model.load_state_dict(state, strict=True)

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.weight_decay),
                                               config=ds_config)
        device = engine.device
        pad_id = tokenizer.pad_token_id
        masker = MaskGenerator(continuation_table(tokenizer), cls_id=tokenizer.cls_token_id,
                               sep_id=tokenizer.sep_token_id, pad_id=pad_id, mask_id=tokenizer.mask_token_id,
                               vocab_size=len(tokenizer), special_ids=list(tokenizer.all_special_ids),
                               encoder_mask_ratio=cfg.encoder_mask_ratio,
                               decoder_mask_ratio=cfg.decoder_mask_ratio).to(device)
        sampler = GlobalBatchSampler(n_train, seed=cfg.seed)

        step, skipped_total, tokens_seen = 0, 0, 0
        if dist.is_main:
            ckpt.remove_incomplete(out_dir)
        barrier()
        if resume_from is not None:
            if not reshard:
                _, client = engine.load_checkpoint(str(resume_from.parent), tag=resume_from.name,
                                                   load_lr_scheduler_states=False)
                if client is None:
                    raise UserError(f"{resume_from}: DeepSpeed could not load this checkpoint.")
            client = resume_info["client_state"]
            self._check_resume_compatible(client, data.fingerprints, resume_from)
            step = int(client["step"])
            skipped_total = int(client["skipped_steps"])
            tokens_seen = int(client["tokens_seen"])
            sampler.load_state_dict(client["sampler"])
            if dist.is_main:
                note = " (new world size: weights restored, optimizer moments reset)" if reshard else ""
                print(f"[retromae-ds] resumed from {resume_from} at step {step}{note}", flush=True)

        logger = MetricsLogger(out_dir, cfg.tensorboard_dir or None, enabled=dist.is_main, resume_step=step)
        meter = Throughput(model_config=model.lm.config, objective=cfg.objective, device=device,
                           dtype=precision, world_size=world, peak_tflops=cfg.peak_tflops or None)
        bar = ProgressBar(total_steps, initial_step=step, enabled=dist.is_main)
        if dist.is_main and step == 0:
            self._print_banner(model, ds_config, total_steps, global_batch, n_train, precision, world)

        def save(tag_step: int, reason: str) -> Path:
            path = ckpt.checkpoint_root(out_dir) / ckpt.tag_for(tag_step)
            client_state = {"step": tag_step, "skipped_steps": skipped_total, "tokens_seen": tokens_seen,
                            "sampler": sampler.state_dict(), "config": cfg.to_dict(),
                            "data": data.fingerprints, "world_size": world}
            barrier()
            engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client_state, save_latest=False)
            if dist.is_main:
                write_model_files(engine.module, tokenizer, cfg, path / "model_config")
            barrier()
            if dist.is_main:
                ckpt.write_marker(path, {"step": tag_step, "world_size": world, "reason": reason,
                                         "zero_stage": engine.zero_optimization_stage(), "client_state": client_state})
                ckpt.prune(out_dir, cfg.keep_last)
            barrier()
            return path

        def evaluate() -> dict:
            return self._evaluate(engine.module, tokenizer, data.heldout, device)

        # --- the loop -------------------------------------------------------------------------------
        budget = config_mod.parse_time_budget(cfg.time_budget)
        start = time.monotonic()
        consecutive_bad = 0
        last_saved = step if resume_from is not None else -1
        exit_code, reason = 0, "finished"
        sizes = np.minimum(data.train_sizes, block_cap) + 2
        loss_sum = torch.zeros(4, dtype=torch.float64, device=device)  # loss, enc, dec, bow (local sums)
        acc_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_micro = 0
        if cfg.eval_interval and step == 0:
            logger.log(0, evaluate(), kind="eval")  # the starting point, to compare against
        engine.train()
        while step < total_steps:
            t0 = time.monotonic()
            lr = lr_at(step, peak_lr=cfg.lr, total_steps=total_steps, warmup=warmup,
                       schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            batch_idx = sampler.next_global_batch(global_batch)
            step_tokens = int(sizes[batch_idx].sum())
            data_wait = 0.0
            for k in range(cfg.grad_accum):
                t_data = time.monotonic()
                micro = micro_batch_indices(batch_idx, cfg.micro_batch_size, world, dist.rank, k)
                tokens, lengths = collate_blocks([data.train[int(i)][:block_cap] for i in micro], pad_id,
                                                max_tokens=block_cap)
                micro_no = k * world + dist.rank
                batch = masker(tokens.to(device, non_blocking=True), lengths.to(device, non_blocking=True),
                               mask_rng(cfg.seed, step, micro_no, device))
                data_wait += time.monotonic() - t_data
                torch.manual_seed(mix_seed(cfg.seed, step, micro_no, 1))  # dropout: same for any resume
                out = engine(**batch)
                loss = out.loss
                if step in cfg.inject_nonfinite_steps:
                    loss = loss * float("nan")
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
            loss_value = float(loss.detach())
            applied = engine.was_step_applied() and math.isfinite(loss_value)
            step += 1
            tokens_seen += step_tokens
            flags = [float(stop.signal != 0), float(budget is not None and time.monotonic() - start > budget),
                     float(not applied)]
            got_signal, out_of_time, bad = all_reduce_max(flags, device)
            if bad:
                skipped_total += 1
                consecutive_bad += 1
            else:
                consecutive_bad = 0
            meter.update(step_time=time.monotonic() - t0, data_wait=data_wait, tokens=step_tokens,
                         samples=global_batch, seq_len=cfg.max_seq_len)

            if step % cfg.log_interval == 0 or step == total_steps:
                sums = all_reduce_sum(loss_sum.tolist() + [float(acc_sum), float(n_micro)], device)
                count = max(1.0, sums[-1])
                metrics = {"loss": sums[0] / count, "encoder_loss": sums[1] / count,
                           "decoder_loss": sums[2] / count, "encoder_accuracy": sums[4] / count,
                           "lr": lr, "grad_norm": _grad_norm(engine), "skipped_steps": skipped_total,
                           "tokens_seen": tokens_seen, "epoch": sampler.epoch}
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
            if cfg.eval_interval and step % cfg.eval_interval == 0 and step < total_steps:
                logger.log(step, evaluate(), kind="eval")
            if cfg.save_interval and step % cfg.save_interval == 0 and step < total_steps:
                save(step, "interval")
                last_saved = step
            if got_signal or out_of_time:
                reason = "signal" if got_signal else "time-budget"
                break

        # --- the end ------------------------------------------------------------------------------
        bar.close()
        if last_saved != step:
            path = save(step, reason)
        else:
            path = ckpt.checkpoint_root(out_dir) / ckpt.tag_for(step)
        if exit_code == EXIT_NONFINITE:
            if dist.is_main:
                print(f"pretrain: error: {consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                      f"(last at step {step}); stopped. The checkpoint {path} holds the last good weights "
                      f"(skipped steps do not change them). Lower --lr, raise --warmup, use --precision bf16 "
                      f"instead of fp16, or check the data.", file=sys.stderr, flush=True)
            logger.close()
            return exit_code
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
            if dist.is_main:
                from retromae_ds.engine.export import export_checkpoint

                target = export_checkpoint(path, out_dir / "export", overwrite=True)
                print(f"[retromae-ds] exported the encoder to {target}", flush=True)
            barrier()
        if dist.is_main:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, float))
            print(f"[retromae-ds] done: {step} steps, {skipped_total} skipped. {shown}", flush=True)
        logger.close()
        return 0

    # ----------------------------------------------------------------------------------------------
    def _evaluate(self, module, tokenizer, heldout, device) -> dict:
        """Lee similarity + held-out retrieval of the [CLS] embedding. Runs on every rank (ZeRO-3
        gathers parameters collectively); results are identical, rank 0 logs them."""
        from retromae_ds.evaluate import heldout_retrieval, lee_similarity

        cfg = self.cfg
        results = {}
        try:
            results.update(lee_similarity(module.encoder, tokenizer, max_length=cfg.eval_max_length, device=device))
        except UserError as err:  # gensim not installed: retrieval eval still runs
            if self.dist.is_main:
                print(f"[retromae-ds] Lee evaluation skipped: {err}", flush=True)
        if heldout:
            results.update(heldout_retrieval(module.encoder, heldout, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                             tokenizer.pad_token_id, seed=cfg.seed, max_length=cfg.eval_max_length,
                                             device=device))
        return results

    def _check_resume_compatible(self, client: dict, fingerprints: list, path) -> None:
        old = client.get("data")
        if old and [(d["vocab_hash"], d["num_blocks"]) for d in old] != \
                [(d["vocab_hash"], d["num_blocks"]) for d in fingerprints]:
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

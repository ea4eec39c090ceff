"""Pre-train RetroMAE with DeepSpeed: `Trainer.setup()` builds the run, `Trainer.train()` is the loop.

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
import copy
import math
import os
import signal
import sys
import time
from pathlib import Path

from retromae_ds import config as config_mod
from retromae_ds.console import say
from retromae_ds.config import TrainConfig
from retromae_ds.engine.build import count_params
from retromae_ds.engine import ds_config
from retromae_ds.engine.checkpointer import Checkpointer, SaveFailed, client_state
from retromae_ds.engine.distributed import all_reduce_max, all_reduce_sum, barrier, on_rank0
from retromae_ds.engine import new_parts
from retromae_ds.engine.state import RunState
from retromae_ds.errors import UserError

# Exit codes (besides 0 = finished or stopped cleanly on a signal / time budget, 2 = a usage or data error):
EXIT_NONFINITE = 3  # --max-nonfinite-steps consecutive NaN/inf steps
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (disk full, quota, I/O error); earlier ones are intact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_mod.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from retromae_ds.engine.preflight import output_dir_of, remove_if_left_empty

    cfg = config_mod.config_from_args(args)
    out_dir = output_dir_of(cfg)
    existed = out_dir.exists()
    rc = None
    try:
        rc = Trainer(cfg, local_rank_arg=getattr(args, "local_rank", None)).train()
        return rc
    finally:
        # a run that failed at start-up leaves no empty --output-dir behind (rank 0 created it)
        if rc != 0 and not existed and os.environ.get("RANK", "0") == "0":
            remove_if_left_empty(out_dir)


def run_cli(argv: list[str] | None = None) -> int:
    """Entry for launch/pretrain.py: same flags as `retromae-ds train`, clear errors on every rank."""
    from retromae_ds.argparsing import Parser
    from retromae_ds.cli import DESCRIPTIONS

    parser = Parser(prog="pretrain.py", description=DESCRIPTIONS["train"],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    first_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    try:
        return main(args)
    except UserError as err:
        if first_rank:
            print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (StopRequest), or one before training started
        if first_rank:
            print("pretrain: interrupted: stopped at once, nothing saved since the last checkpoint", file=sys.stderr,
                  flush=True)
        return 130


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and platforms."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x ^= (int(p) + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2)) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class StopRequest:
    """SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit) and a first Ctrl-C (SIGINT) set
    a flag; the loop finishes the current step, saves and exits 0 (so a job can be requeued, and Ctrl-C
    loses nothing). A second Ctrl-C raises KeyboardInterrupt at once: no save, exit 130.

    "Second" means at least `SIGINT_REPEAT_S` later: torchrun's agent, itself interrupted by the same
    Ctrl-C, passes it on to the ranks as another SIGINT a moment later, which must not abort the save. (The
    deepspeed launcher passes SIGTERM on instead, which changes nothing once a stop is under way.)"""

    SIGINT_REPEAT_S = 1.0

    def __init__(self):
        self.signal = 0
        self.interrupted_at = None  # time.monotonic() of the first SIGINT
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self.interrupted_at is not None:
                if now - self.interrupted_at < self.SIGINT_REPEAT_S:
                    return  # the same Ctrl-C, passed on by a launcher
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.interrupted_at = now
            if os.environ.get("RANK", "0") == "0":  # os.write: safe inside a signal handler (print is not)
                os.write(2, b"\n[retromae-ds] Ctrl-C: finishing this step, then saving a checkpoint and exiting "
                            b"(press Ctrl-C again to stop at once, without saving)\n")
        self.signal = self.signal or signum


class LogWindow:
    """What this rank adds up between two log steps, on the device except the token counts (host ints):
    no step reads a device value back; `log_step` sums every rank's window in one collective."""

    def __init__(self, device):
        import torch

        self.loss_sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, encoder, decoder, bag-of-words
        self.accuracy_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.token_counts = [0, 0]  # [real tokens, computed token positions] (padding efficiency)
        self.micro_batches = 0

    def add(self, parts: list, accuracy, weight: float, real_tokens: int, computed_tokens: int) -> None:
        """One micro-batch: its logged loss parts (see `micro_batch_objective`), weighted accuracy, tokens."""
        import torch

        with torch.no_grad():
            self.loss_sums += torch.stack([p.detach().double() for p in parts])
            if accuracy is not None:
                self.accuracy_sum += accuracy.detach().double() * weight
        self.token_counts[0] += real_tokens
        self.token_counts[1] += computed_tokens
        self.micro_batches += 1

    def packed(self):
        """[loss, encoder, decoder, bow, accuracy, real tokens, computed positions, micro-batches] (fp64)."""
        import torch

        sums = self.loss_sums
        return torch.cat([sums, self.accuracy_sum[None], sums.new_tensor(self.token_counts),
                          sums.new_tensor([self.micro_batches])])

    def reset(self) -> None:
        self.loss_sums.zero_()
        self.accuracy_sum.zero_()
        self.token_counts = [0, 0]
        self.micro_batches = 0


class Trainer:
    def __init__(self, cfg: TrainConfig, local_rank_arg: int | None = None):
        # `requested`: the parsed flags, never changed (saved as the checkpoint's "config"); `cfg`: the
        # working copy, which setup resolves (DeepSpeed's values, the data's length, the demo's defaults)
        # and every phase reads (saved beside it as "resolved_config")
        self.requested = cfg
        self.cfg = copy.deepcopy(cfg)
        self.local_rank_arg = local_rank_arg

    # ----------------------------------------------------------------------------------------------
    def train(self) -> int:
        """The loop: a step, its bookkeeping (one host-device sync every --log-interval steps), then
        evaluation, saving and stopping as they fall due."""
        self.setup()
        cfg, state, ckpts = self.cfg, self.state, self.checkpointer
        if cfg.eval_interval and state.step == 0:
            state.first_eval = self.evaluate(0)  # the starting point, to compare against
        last_saved = state.step if self.resumed else -1
        reason = "finished"
        decay_start = False  # wsd: this step is the first to reach the decay start; its checkpoint is kept
        self.engine.train()
        try:
            while self.steps_left() > 0:
                self.profiler.before_step(state.step + 1)
                t0 = time.monotonic()
                data_wait = self.train_step()
                step = state.step
                finished = self.steps_left() == 0
                eval_now = bool(cfg.eval_interval) and step % cfg.eval_interval == 0 and not finished
                decay_start = self.sched.reaches_decay_start(self.sampler.total_consumed, self.global_batch)
                save_now = (bool(cfg.save_interval) and step % cfg.save_interval == 0 or decay_start) and not finished
                log_now = step % cfg.log_interval == 0 or finished
                stop = self.agree_on_flags() if (log_now or eval_now or save_now) else None
                # after the sync: the step that syncs also counts the device work the steps before it queued
                self.meter.update(step_time=time.monotonic() - t0, data_wait=data_wait, tokens=self.step_tokens,
                                  samples=self.global_batch, seq_len=cfg.max_seq_len)
                self.profiler.after_step(step)
                self.bar.update(step, self.log_step() if log_now else None)
                if self.consecutive_bad >= cfg.max_nonfinite_steps:
                    self.bar.close()
                    return self.stop_nonfinite(last_saved)
                if eval_now:
                    self.evaluate(step)
                if save_now:
                    # during a run of NaN/inf steps: save only finite weights, and prune nothing, so the
                    # checkpoint from before the trouble survives whatever DeepSpeed did with the gradients
                    if self.consecutive_bad == 0 or ckpts.weights_finite_everywhere():
                        self.save("decay-start" if decay_start else "interval", prune=self.consecutive_bad == 0,
                                  keep=decay_start)
                        last_saved = step
                if (eval_now or save_now) and not stop:  # a signal may have arrived meanwhile
                    stop = self.stop_flags()
                if stop:
                    reason = stop
                    break
            self.bar.close()
            path = self.save(reason, keep=decay_start) if last_saved != state.step else ckpts.path_for(state.step)
        except SaveFailed as failed:
            self.bar.close()
            self.logger.close()
            if self.dist.is_main:
                print(f"pretrain: error: {ckpts.failure_message(failed, count_params(self.model))}",
                      file=sys.stderr, flush=True)
            return EXIT_SAVE_FAILED
        finally:
            self.loader.close()
            self.profiler.close()
        return self.finish(reason, path)

    # ----------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimizer step over this rank's micro-batches (loaded one step ahead on the loader's
        thread). Nothing here reads a device value back: NaN/inf flags and loss sums stay on the device
        until the next log step. Returns the seconds spent waiting for data."""
        import numpy as np
        import torch

        from retromae_ds.data.masking import mask_rng

        cfg, state, engine, sampler = self.cfg, self.state, self.engine, self.sampler
        # the new parts' groups (--new-parts-warmup-steps) take the LR, the encoder's its own (0 during the phase)
        lr, encoder_lr = self.rates.at(sampler.total_consumed, state.step)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr if group.get(new_parts.NEW_PART_KEY) else encoder_lr
        self.lr, self.lr_encoder = lr, encoder_lr
        if self.ahead is None:  # the first step (later ones were submitted one step early)
            self.ahead = self.loader.submit(sampler.peek_global_batch(self.global_batch))
        batch_idx, ready = sampler.next_global_batch(self.global_batch), self.ahead
        # the next step's blocks load on the loader's thread while this step runs on the device
        self.ahead = self.loader.submit(sampler.peek_global_batch(self.global_batch)) if self.steps_left() > 0 else None
        self.step_tokens = int((np.minimum(self.data.train_sizes[batch_idx], self.block_cap) + 2).sum(dtype=np.int64))
        t_data = time.monotonic()
        micro_batches = ready.result()
        data_wait = time.monotonic() - t_data

        device, world, rank = self.device, self.dist.world_size, self.dist.rank
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any micro-batch's loss
        searching = _loss_scale_can_fall(engine)  # before the step: the step may lower it
        for k, micro in enumerate(micro_batches):
            micro_no = k * world + rank
            batch = self.masker(*micro.to(device), mask_rng(cfg.seed, state.step, micro_no, device), plan=micro.plan)
            torch.manual_seed(mix_seed(cfg.seed, state.step, micro_no, 1))  # dropout: same for any resume
            out = engine(**batch)
            nonfinite |= ~torch.isfinite(out.loss.detach())
            weight = micro.real_tokens * len(micro_batches) * world / self.step_tokens if cfg.group_by_length else 1.0
            objective, parts = micro_batch_objective(out, weight, cfg.bow_loss_weight)
            engine.backward(objective)
            engine.step()
            self.window.add(parts, out.encoder_accuracy, weight, micro.real_tokens, micro.computed_tokens)
        state.step += 1
        state.tokens_seen += self.step_tokens
        skipped = not engine.was_step_applied()  # a host flag (DeepSpeed has synced for it already)
        if skipped and searching and not bool(nonfinite):
            # fp16's dynamic loss scale overflowed and DeepSpeed lowers it: its normal search for a
            # scale that fits, not a fault (a non-finite loss still is one)
            state.loss_scale_skips += 1
            skipped = False
        bad_step = nonfinite | skipped
        self.bad_run = (self.bad_run + 1) * bad_step  # NaN/inf steps in a row, so far
        self.bad_new += bad_step  # NaN/inf steps since the last check
        return data_wait

    def agree_on_flags(self) -> str | None:
        """The step's one host-device sync, every --log-interval steps (and before a save or an
        evaluation): all ranks agree on signals, the time budget and NaN/inf steps. So a stop request or
        the --max-nonfinite-steps limit acts up to --log-interval steps late; the checkpoint is still
        exact. DeepSpeed skips a bad step on every rank at once, so the ranks' counts agree and MAX merges
        them. Returns "signal" / "time-budget" when the run must stop."""
        import torch

        flags = torch.tensor(self.host_flags(), dtype=torch.float64)
        got_signal, out_of_time, run_max, new_max = all_reduce_max(torch.cat(
            [flags.to(self.device), torch.stack([self.bad_run, self.bad_new]).to(torch.float64)]), self.device)
        self.consecutive_bad = int(run_max)
        self.state.skipped_steps += int(new_max)
        self.bad_new.zero_()
        return "signal" if got_signal else "time-budget" if out_of_time else None

    def host_flags(self) -> list[float]:
        """This rank's [got a signal, out of time]."""
        late = self.budget is not None and time.monotonic() - self.started > self.budget
        return [float(self.stop_request.signal != 0), float(late)]

    def stop_flags(self) -> str | None:
        """(signal, out of time), agreed by all ranks: one rank's SIGTERM stops everyone."""
        got, late = all_reduce_max(self.host_flags(), self.device)
        return "signal" if got else "time-budget" if late else None

    def log_step(self) -> dict:
        """Average the losses since the last log over all ranks, add rates and counters, write them."""
        cfg, state, engine = self.cfg, self.state, self.engine
        sums = all_reduce_sum(self.window.packed(), self.device)
        count = max(1.0, sums[-1])
        metrics = {"loss": sums[0] / count, "encoder_loss": sums[1] / count, "decoder_loss": sums[2] / count,
                   "encoder_accuracy": sums[4] / count, "lr": self.lr, "grad_norm": _grad_norm(engine),
                   "skipped_steps": state.skipped_steps, "loss_scale_skips": state.loss_scale_skips,
                   "tokens_seen": state.tokens_seen, "samples_seen": self.sampler.total_consumed,
                   "epoch": self.sampler.epoch, "padding_efficiency": sums[5] / max(1.0, sums[6])}
        if self.new_parts.steps:  # --new-parts-warmup-steps: the encoder's LR (0 during the phase)
            metrics["lr_encoder"] = self.lr_encoder
        if cfg.objective == "mlm":
            metrics["decoder_loss"] = float("nan")  # no decoder: null in metrics.jsonl
        if cfg.objective == "dupmae":
            metrics["bow_loss"] = sums[3] / count
        if self.precision == "fp16":
            metrics["loss_scale"] = float(getattr(engine.optimizer, "cur_scale",
                                                  getattr(engine.optimizer, "loss_scale", 0.0)))
        metrics.update(self.meter.summary())
        self.logger.log(state.step, metrics)
        self.window.reset()
        return metrics

    def evaluate(self, step: int) -> dict:
        """Lee similarity + held-out retrieval of the [CLS] embedding and the decoder's [CLS] gain on
        held-out blocks (`cls_gain`), logged. Runs on every rank (ZeRO-3 gathers parameters collectively);
        results are identical, rank 0 logs them."""
        from retromae_ds.evaluate import cls_gain, heldout_retrieval, lee_similarity

        cfg, module, tokenizer = self.cfg, self.engine.module, self.tokenizer
        results = {}
        try:
            results.update(lee_similarity(module.encoder, tokenizer, max_length=self.eval_max_length,
                                          device=self.device))
        except UserError as err:  # gensim not installed: retrieval eval still runs
            say(f"Lee evaluation skipped: {err}")
        if self.data.heldout:
            results.update(heldout_retrieval(module.encoder, self.data.heldout, tokenizer.cls_token_id,
                                             tokenizer.sep_token_id, tokenizer.pad_token_id, seed=cfg.seed,
                                             max_length=self.eval_max_length, device=self.device))
            # blocks cut at the evaluation's length (never beyond the trained one); the heads chunk by
            # --ce-chunk-size here too, so the evaluation needs no more memory than a training step
            gain, why_not = cls_gain(module, self.data.heldout, self.masker, seed=cfg.seed,
                                     batch_size=cfg.micro_batch_size,
                                     max_tokens=min(self.block_cap, self.eval_max_length - 2))
            results.update(gain)
            if why_not and not self.cls_gain_noted:
                say(why_not)  # the same reason every evaluation: said once
                self.cls_gain_noted = True
        prefix, retrieval_set = self.data.retrieval
        if retrieval_set is not None:  # --eval-pairs / --eval-beir: zero-shot, cosine, no intervals (cheap)
            from retromae_ds.retrieval.evaluation import score_set

            results.update(score_set(module.encoder, tokenizer, retrieval_set, prefix=prefix,
                                     max_length=self.eval_max_length, batch_size=cfg.micro_batch_size,
                                     device=self.device, bm25=self.dist.is_main and self.bm25_line is None).metrics)
            self.bm25_line = self.bm25_line or {k: v for k, v in results.items() if k.endswith("_bm25")}
            results.update(self.bm25_line)  # the lexical reference, computed once, logged beside each evaluation
        self.logger.log(step, results, kind="eval")
        if self.dist.is_main:
            self.bar.write(eval_line(step, results, self.last_eval))
        self.last_eval = results
        return results

    def save(self, reason: str, prune: bool = True, keep: bool = False) -> Path:
        saved = client_state(self.state, self.sampler.state_dict(), self.requested.to_dict(), self.cfg.to_dict(),
                             self.data.fingerprints, self.dist.world_size, self.sched.to_dict(), self.sched.batch)
        return self.checkpointer.save(self.state.step, reason, saved, prune=prune, keep=keep)

    def steps_left(self) -> int:
        return max(0, math.ceil((self.sched.end_samples - self.sampler.total_consumed) / self.global_batch))

    def stop_nonfinite(self, last_saved: int) -> int:
        """Too many NaN/inf steps in a row. Skipped steps leave the weights as they were, but a DeepSpeed
        that applied a bad gradient would not: save only weights that are finite everywhere, and never
        prune at this exit, so the last good checkpoint survives whatever happened."""
        step = self.state.step
        finite = self.checkpointer.weights_finite_everywhere()
        if finite and last_saved != step:
            path = self.save("non-finite", prune=False)
            held = f"The checkpoint {path} holds the weights after the last good step (skipped steps do not change them)."
        else:
            where = self.checkpointer.last_good()
            held = ("The weights are no longer finite, so nothing was saved; " if not finite else "") + \
                (f"the last good checkpoint is {where}." if where else "there is no earlier checkpoint.")
        if self.dist.is_main:
            print(f"pretrain: error: {self.consecutive_bad} consecutive steps had a NaN/inf loss or gradient "
                  f"(last at step {step}); stopped. {held} Lower --lr, raise --warmup, use --precision bf16 "
                  f"instead of fp16, or check the data.", file=sys.stderr, flush=True)
        self.logger.close()
        return EXIT_NONFINITE

    def finish(self, reason: str, path: Path) -> int:
        """After the last step: a stop leaves the checkpoint to resume from; a finished run evaluates,
        exports (rank 0; an error there reaches every rank) and prints the start and end side by side."""
        cfg, state, dist = self.cfg, self.state, self.dist
        if reason in ("signal", "time-budget"):
            say(f"stopped on {reason} at step {state.step}/{self.total_steps}; checkpoint "
                f"{path}. Run the same command again (with --resume auto) to continue.")
            self.logger.close()
            return 0
        final = self.evaluate(state.step)
        if cfg.export:
            barrier()
            from retromae_ds.engine import export

            def export_on_rank0() -> None:
                target = export.export_checkpoint(path, self.out_dir / "export", overwrite=True)
                say(f"exported the encoder to {target}")

            on_rank0(export_on_rank0, dist.is_main, lambda why: (  # also the barrier after the export
                f"exporting {path} to {self.out_dir / 'export'} failed on rank 0: {why}. Training finished and the "
                f"checkpoint is complete: run `retromae-ds export {path} OUT_DIR` once the cause is fixed."))
        searched = f", {state.loss_scale_skips} loss-scale skips (fp16)" if self.precision == "fp16" else ""
        say(f"done: {state.step} steps, {state.skipped_steps} skipped as NaN/inf{searched}. "
            f"{_compare_evals(state.first_eval, final)}")
        self.logger.close()
        return 0

    # ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step, phase by phase (each one below, in this order)."""
        from retromae_ds.engine.preflight import check_inputs

        check_inputs(self.cfg)  # flags, paths, tokenizer/data match, --output-dir: before anything slow
        point = self._start()
        self._build_data_and_model(point)
        ds_json, n_train = self._build_engine(point)
        self._build_loader()
        self._restore_state(point)
        self._start_monitors(ds_json, n_train)

    def _start(self):
        """The process group, the demo's data, the output folder, and what to resume from: decided once,
        here, by rank 0 (which verifies and sets damaged checkpoints aside); every rank follows, and every
        later phase reads this one decision (a `ResumePoint`, or None for a fresh start)."""
        from retromae_ds.engine.distributed import init_distributed

        cfg = self.cfg
        self.stop_request = StopRequest()
        dist = self.dist = init_distributed(self.local_rank_arg, timeout=config_mod.parse_dist_timeout(cfg.dist_timeout))
        if cfg.is_demo:
            from retromae_ds.engine.build import apply_demo_defaults, ensure_demo_data

            apply_demo_defaults(cfg)
            ensure_demo_data(cfg, dist.is_main)
            barrier()
        self.out_dir = Path(cfg.output_dir)
        if dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(cfg, dist, self.out_dir)
        point = self.checkpointer.find_resume()
        self.resumed = point is not None
        return point

    def _build_data_and_model(self, point) -> None:
        """Tokenizer, data (train blocks and held-out ones), the model (a preset's config from the
        checkpoint resumed from), and the lengths that follow from them."""
        from retromae_ds.engine.build import build_model, load_data, load_tokenizer, resolve_max_seq_len
        from retromae_ds.model.positions import token_positions

        cfg = self.cfg
        self.tokenizer = tokenizer = load_tokenizer(cfg)
        self.data = data = load_data(cfg, tokenizer)
        self.model = model = build_model(cfg, tokenizer, resume_from=point.path if point else None)
        cfg.max_seq_len = resolve_max_seq_len(cfg, data.meta, model.lm.config)
        # evaluation texts are cut to what the position table holds (a 128-position model and the
        # default --eval-max-length 256 would otherwise fail at the end of training)
        self.eval_max_length = min(cfg.eval_max_length, token_positions(model.lm) or cfg.eval_max_length)
        self.block_cap = cfg.max_seq_len - 2
        model.bound_head_calls(cfg.max_seq_len, cfg.encoder_mask_ratio)  # equal head calls on every rank (ZeRO-3)

    def _build_engine(self, point) -> tuple[dict, int]:
        """The DeepSpeed config, the schedule (the checkpoint's when resuming), the consolidated weights of
        a resume on a new world size, the new-parts phase, and the engine. Returns (the resolved DeepSpeed
        config, samples per epoch) for the start-up line."""
        import deepspeed
        import torch

        from retromae_ds.engine.build import param_groups, write_model_files
        from retromae_ds.engine.distributed import native_bf16
        from retromae_ds.engine.schedule import plan_schedule
        from retromae_ds.engine.unused_muon import skip_unused_muon

        cfg, dist, model, ckpts = self.cfg, self.dist, self.model, self.checkpointer
        n_train = getattr(self.data.train, "samples_per_epoch", len(self.data.train))  # a blend's: weighted shares
        capability = torch.cuda.get_device_capability(dist.device) if dist.device_type == "cuda" else None
        self.precision = precision = ds_config.resolve_precision(
            cfg, dist.device_type, native_bf16(dist.device_type, capability))
        ds_json = ds_config.resolve_deepspeed_config(
            ds_config.load_deepspeed_json(cfg.deepspeed), cfg, world_size=dist.world_size, precision=precision,
            source=f"--deepspeed {cfg.deepspeed}")
        self.global_batch = cfg.micro_batch_size * cfg.grad_accum * dist.world_size  # after the JSON set them
        if cfg.compile:
            self._compile(ds_json)

        self.sched = plan_schedule(max_steps=cfg.max_steps, epochs=cfg.epochs, warmup=cfg.warmup,
                                   num_samples=n_train, batch=point.schedule_batch if point else self.global_batch,
                                   schedule=cfg.schedule, decay_fraction=cfg.decay_fraction,
                                   previous=point.schedule if point else None)
        if self.sched.total_steps <= 0:
            raise UserError("nothing to train: give --max-steps N or --epochs E (> 0).")
        # ZeRO partitions are per-rank: with a new world size, start from the consolidated fp32 weights
        # (read once, by rank 0, then broadcast); Adam moments restart
        consolidated = ckpts.load_consolidated(model, point, keep=precision != "fp32") if point and point.reshard \
            else None

        # --new-parts-warmup-steps: the phase (the checkpoint's, on resume) and, with one, groups split by part
        self.new_parts, note = new_parts.plan(
            cfg.new_parts_warmup_steps, cfg.new_parts_encoder_lr_ratio, model,
            point.new_parts_warmup if point else None,
            self.sched.position(point.consumed_samples) if point else None,
            where=str(point.path) if point else "")
        if note:
            say(note)
        groups = param_groups(model, cfg.weight_decay)
        if self.new_parts.splits_groups():
            groups = new_parts.param_groups_by_part(groups, model, self.new_parts.parts)
        skip_unused_muon(ds_json)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_json)
        self.engine, self.device = engine, engine.device
        tokenizer = self.tokenizer
        ckpts.attach(engine, lambda folder: write_model_files(engine.module, tokenizer, cfg, folder),
                     _run_facts(engine, model, precision))
        if point and point.reshard and precision != "fp32":
            ckpts.restore_masters(consolidated)
        return ds_json, n_train

    def _build_loader(self) -> None:
        """The mask generator (on the device), the sampler (length groups cut for the run's first global
        batch, kept across resumes like the schedule) and the loader that fetches a step ahead."""
        from retromae_ds.data.loader import MicroBatchLoader
        from retromae_ds.data.masking import MaskGenerator, continuation_table, word_break_table
        from retromae_ds.data.sampler import GlobalBatchSampler, LengthGrouping

        cfg, tokenizer, dist = self.cfg, self.tokenizer, self.dist
        self.masker = MaskGenerator(
            continuation_table(tokenizer), cls_id=tokenizer.cls_token_id, sep_id=tokenizer.sep_token_id,
            pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
            special_ids=list(tokenizer.all_special_ids), encoder_mask_ratio=cfg.encoder_mask_ratio,
            decoder_mask_ratio=cfg.decoder_mask_ratio, decoder_mask_pool=cfg.decoder_mask_pool,
            word_breaks=word_break_table(tokenizer)).to(self.device)
        static = cfg.compile or cfg.static_shapes
        if static:
            self.masker.sync_free = True  # one shape every step (the heads' static capacity), on any device
        grouping = LengthGrouping(batch=self.sched.batch, window=cfg.group_window) if cfg.group_by_length else None
        self.sampler = GlobalBatchSampler.for_dataset(self.data.train, seed=cfg.seed, grouping=grouping)
        self.loader = MicroBatchLoader(self.data.train, self.masker, tokenizer.pad_token_id, self.block_cap,
                                       cfg.micro_batch_size, dist.world_size, dist.rank, cfg.grad_accum,
                                       pin=self.device.type == "cuda", static_width=static,
                                       pad_multiple=1 if self.device.type == "cpu" else 8)
        self.ahead = None  # the next step's micro-batches, loading

    def _restore_state(self, point) -> None:
        """The run's state, fresh or the checkpoint's (DeepSpeed's own state too, and the data position),
        what a resume changed, the learning rates, and the counters of the loop."""
        import torch

        from retromae_ds.engine.schedule import LearningRates, resume_note

        cfg = self.cfg
        self.checkpointer.begin(point, self.data.fingerprints)
        self.state = RunState()
        if point:
            self.state = point.state
            if point.reshard:
                self.state.rewarm_from = self.state.step
            self.sampler.load_state_dict(point.sampler_state)
            note = (f" (new world size: weights restored, optimizer moments reset, LR re-warmed over "
                    f"{self.sched.rewarm_steps()} steps)") if point.reshard else ""
            say(f"resumed from {point.path} at step {self.state.step}{note}")
            changed = resume_note(point.schedule, self.sched, self.sched.position(self.sampler.total_consumed),
                                  dict(peak_lr=cfg.lr, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio))
            if changed:
                say(changed)
            batch_note = self._batch_change_note(point)
            if batch_note:
                say(batch_note)
        self.state.new_parts_warmup = self.new_parts.to_dict()  # what the next checkpoint records
        self.rates = LearningRates(self.sched, peak_lr=cfg.lr, kind=cfg.schedule, min_ratio=cfg.min_lr_ratio,
                                   rewarm_from=self.state.rewarm_from, new_parts=self.new_parts)
        if self.sched.position(self.sampler.total_consumed) < self.new_parts.steps:
            say(self.new_parts.describe())
        self.consecutive_bad = 0
        self.bad_run = torch.zeros((), dtype=torch.int64, device=self.device)  # NaN/inf steps in a row (device)
        self.bad_new = torch.zeros((), dtype=torch.int64, device=self.device)  # ... since the last check
        self.window = LogWindow(self.device)
        self.lr = self.lr_encoder = 0.0
        self.cls_gain_noted = False  # why eval/cls_gain does not apply is said once per run
        self.last_eval = None  # the previous evaluation of this session: the console line shows changes since it
        self.bm25_line = None  # BM25 on --eval-pairs/--eval-beir: the same at every evaluation, computed once
        self.step_tokens = 0

    def _start_monitors(self, ds_json: dict, n_train: int) -> None:
        """metrics.jsonl and TensorBoard, throughput, the progress bar, the profiler, the time budget,
        and the start-up line (on every start: a resume may run another batch, precision or length)."""
        from retromae_ds.monitor.metrics import MetricsLogger
        from retromae_ds.monitor.profiler import StepProfiler
        from retromae_ds.monitor.progress import ProgressBar
        from retromae_ds.monitor.throughput import Throughput

        cfg, dist = self.cfg, self.dist
        self.total_steps = self.state.step + self.steps_left()
        self.logger = MetricsLogger(self.out_dir, cfg.tensorboard_dir or None, enabled=dist.is_main,
                                    resume_step=self.state.step if self.resumed else None)
        self.meter = Throughput(model_config=self.model.lm.config, objective=cfg.objective, device=self.device,
                                dtype=self.precision, world_size=dist.world_size, peak_tflops=cfg.peak_tflops or None)
        self.bar = ProgressBar(self.total_steps, initial_step=self.state.step, enabled=dist.is_main)
        self.profiler = StepProfiler(config_mod.parse_profile_steps(cfg.profile_steps), self.out_dir / "profile",
                                     enabled=dist.is_main, device=self.device)
        self.budget = config_mod.parse_time_budget(cfg.time_budget)
        self.started = time.monotonic()
        self._print_banner(ds_json, n_train)

    def _compile(self, ds_json: dict) -> None:
        cfg = self.cfg
        if ds_json.get("zero_optimization", {}).get("stage", 0) >= 3:
            raise UserError(f"--compile with ZeRO-3 ({cfg.deepspeed}): ZeRO-3 gathers each layer's parameters in "
                            f"hooks around its call, which compiled layers do not run through. Use ZeRO-1 or "
                            f"ZeRO-2 (--deepspeed zero1 / zero2) with --compile, or drop --compile.")
        compiled = self.model.compile_layers()
        say(f"--compile: {compiled} layers compiled with torch.compile; the first step "
            f"builds their kernels (minutes for big models), later steps reuse them.")

    def _batch_change_note(self, point) -> str | None:
        """What a resume with another global batch (ranks x micro-batch x accumulation) does, or None: the
        schedule and the end of the run stay in samples, so the number of steps left changes."""
        before = point.run_config
        try:
            parts = (point.world_size, int(before["micro_batch_size"]), int(before["grad_accum"]))
        except (KeyError, TypeError, ValueError):  # a checkpoint without these: nothing to compare
            return None
        now = (self.dist.world_size, self.cfg.micro_batch_size, self.cfg.grad_accum)
        if parts[0] * parts[1] * parts[2] == self.global_batch:
            return None
        left = self.steps_left()
        return (f"global batch {parts[0] * parts[1] * parts[2]} -> {self.global_batch} (ranks x micro-batch x "
                f"accumulation: {' x '.join(map(str, parts))} -> {' x '.join(map(str, now))}). The schedule and the "
                f"end of the run are kept in samples (steps of the run's first global batch, {self.sched.batch}): "
                f"{left} steps of {self.global_batch} samples remain, so the run now ends at step "
                f"{self.state.step + left}." + ("" if point.reshard else " Same world size: the optimizer state "
                                                "(Adam's moments) continues as saved."))

    def _print_banner(self, ds_json: dict, n_train: int) -> None:
        cfg, world = self.cfg, self.dist.world_size
        stage = ds_json.get("zero_optimization", {}).get("stage", 0)
        say(f"{cfg.objective} | {count_params(self.model) / 1e6:.1f}M params | ZeRO-{stage} "
            f"{self.precision} | world {world} x micro {cfg.micro_batch_size} x accum {cfg.grad_accum} = "
            f"{self.global_batch}/step | {self.total_steps} steps = "
            f"{self.total_steps * self.global_batch / n_train:.2f} epochs of {n_train} blocks | "
            f"L={cfg.max_seq_len} | out {cfg.output_dir}")


EVAL_LINE_KEYS = ("heldout/mrr10", "cls_gain", "heldout/decoder_loss", "lee/pearson_cls", "lee/spearman_cls",
                  "pairs/ndcg10_cls", "pairs/mrr10_cls", "beir/ndcg10_cls", "beir/mrr10_cls")


def eval_line(step: int, results: dict, previous: dict | None) -> str:
    """One console line per evaluation: the key numbers, each with its change since the evaluation before
    (the same numbers are in metrics.jsonl and TensorBoard's eval/ tags)."""
    shown = []
    for key in EVAL_LINE_KEYS:
        value = results.get(key)
        if not isinstance(value, float):
            continue
        before = (previous or {}).get(key)
        change = f" ({value - before:+.4f})" if isinstance(before, float) else ""
        shown.append(f"{key} {value:.4f}{change}")
    return f"[retromae-ds] eval at step {step}: " + (", ".join(shown) if shown else "nothing to evaluate")


def micro_batch_objective(out, weight: float, bow_loss_weight: float):
    """(the loss to backpropagate, [loss, encoder, decoder, bag-of-words] for the log) of one micro-batch.

    `weight` 1: the model's loss as it is. Under --group-by-length, `weight` is the micro-batch's share of
    the step's tokens times the number of micro-batches in the step (so the weights average to 1): the
    token means (encoder, decoder) count by it, so that a token weighs the same in a batch of short
    samples as in one of long ones, as it does in mixed batches. DupMAE's bag-of-words loss is a mean over
    samples, and every micro-batch holds as many samples: it keeps weight 1. The logged parts are weighted
    as optimized, so their mean over a step's micro-batches is the step's objective."""
    zero = out.loss.new_zeros(())
    decoder = out.decoder_loss if out.decoder_loss is not None else zero
    bow = out.bow_loss if out.bow_loss is not None else zero
    if weight == 1.0:
        return out.loss, [out.loss, out.encoder_loss, decoder, bow]
    objective = (out.encoder_loss + decoder) * weight
    if out.bow_loss is not None:
        objective = objective + bow_loss_weight * out.bow_loss
    return objective, [objective, out.encoder_loss * weight, decoder * weight, bow]


def _run_facts(engine, model, precision: str) -> dict:
    """What DeepSpeed actually runs, recorded in every checkpoint marker."""
    optimizer = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return {"precision": precision, "zero_stage": engine.zero_optimization_stage(),
            "grad_accum_dtype": str(engine.get_data_types()[1]).replace("torch.", ""),
            "communication_dtype": str(engine.communication_data_type).replace("torch.", ""),
            "optimizer": type(optimizer).__name__,
            "activation_checkpointing": bool(model.is_gradient_checkpointing and _encoder_recomputes(model.lm))}


def _compare_evals(first: dict, final: dict) -> str:
    """The final evaluation, with the one before step 1 beside it when the run has it: 'name start -> end'."""
    shown = []
    for k, v in final.items():
        if isinstance(v, float):
            start = first.get(k)
            shown.append(f"{k} {start:.4f} -> {v:.4f}" if isinstance(start, float) else f"{k}={v:.4f}")
    return ("evaluation, start -> end: " if first else "") + ", ".join(shown)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    try:
        return float(norm) if norm is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def _loss_scale_can_fall(engine) -> bool:
    """fp16 with a dynamic loss scale above its minimum: an overflow now makes DeepSpeed skip the step and
    lower the scale (after `hysteresis` overflows), which is how it finds a scale that fits. At the
    minimum (or with a static scale, or bf16/fp32) a skipped step means gradients no scale makes finite."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not engine.fp16_enabled() or not getattr(scaler, "dynamic", False):
        return False
    return float(scaler.cur_scale) > float(scaler.min_scale)


def _encoder_recomputes(lm) -> bool:
    """The HF encoder's own activation-checkpointing flag (transformers 5 renamed it; reading the old
    name prints a deprecation warning on every rank)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(lm), name, None), property):
            return bool(getattr(lm, name))
    return True


if __name__ == "__main__":  # python -m retromae_ds.engine.trainer: the entry outside a clone (no launch/)
    sys.exit(run_cli())

#!/usr/bin/env python
"""Plant one-line bugs in a copy of the project and check that the relevant tests fail on each.

    python -m scripts.mutation_check                  # baseline + every mutation (~30 min on 2 cores)
    python -m scripts.mutation_check --list           # the mutations and the tests each one must fail
    python -m scripts.mutation_check --only reshard-no-weights sigterm-skips-a-batch --no-baseline
    python -m scripts.mutation_check --source /tmp/head   # a `git archive HEAD` export instead of the checkout

How: the working tree (without .git, runs/, data/, caches) is copied to a temporary folder once. The
baseline runs every selected mutation's tests on the unmodified copy: they must pass, else a "caught"
below would mean nothing. Then, for each mutation, exactly one snippet of one file is replaced (the
snippet must occur exactly once: a missing or repeated snippet is a script ERROR, not a pass, so that
edits of the product that move the code show up here), the tests run with `pytest -x` (--all-tests:
every listed test, to see which of them catch it), and the file is restored. Tests run in the copy with PYTHONPATH set to it; the test process checks that
`retromae_ds` is imported from the copy, and the training runs (tests/helpers/probe_pretrain.py) record the
`retromae_ds.__file__` they imported, which the tests check too.

Result per mutation: CAUGHT (pytest exit 1: some test failed), MISSED (the tests passed on the broken
code), TIMEOUT, or ERROR (snippet not found / ambiguous, pytest usage error, nothing collected).
Exit status 0 only when the baseline passed and every mutation was CAUGHT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
E = "tests/test_engine.py::"
M = "tests/test_config_matrix.py::"
F = "tests/test_cluster_faults.py::"
R = "tests/test_math_reference.py::"
RM = "tests/test_retrieval_metrics.py::"
RE = "tests/test_retrieval_eval.py::"
HC = "tests/test_head_calls.py::"
Z = "tests/test_zero_failures.py::"


@dataclass
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: list[str]
    what: str


MUTATIONS = [
    Mutation("reshard-no-weights", "retromae_ds/engine/checkpointer.py",
             "model.load_state_dict(state, strict=True)", "pass",
             [E + "test_resume_with_a_different_world_size_continues_the_weights_and_the_data"],
             "resume with another world size does not load the consolidated weights (back to init)"),
    Mutation("ac-not-enabled", "retromae_ds/engine/build.py",
             "if cfg.activation_checkpointing:\n        model.gradient_checkpointing_enable()",
             "if cfg.activation_checkpointing:\n        pass",
             [E + "test_activation_checkpointing_recomputes_and_gives_the_same_run"],
             "--activation-checkpointing ignored (the enable call removed)"),
    Mutation("ac-decoder-not-recomputed", "retromae_ds/model/retromae.py",
             "self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={\"use_reentrant\": False})\n"
             "        self._checkpoint_decoder = True",
             "self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={\"use_reentrant\": False})\n"
             "        self._checkpoint_decoder = False",
             [E + "test_activation_checkpointing_recomputes_and_gives_the_same_run"],
             "activation checkpointing covers the encoder layers but not the decoder layer"),
    Mutation("ac-decoder-branch-never-taken", "retromae_ds/model/retromae.py",
             "if self._checkpoint_decoder and self.training and torch.is_grad_enabled():", "if False:",
             ["tests/test_trainer_features.py::"
              "test_activation_checkpointing_keeps_less_for_backward_and_gives_the_same_gradients",
              E + "test_activation_checkpointing_recomputes_and_gives_the_same_run"],
             "the module says checkpointing is on, but the decoder layer is never checkpointed"),
    Mutation("bf16-resolves-to-fp32", "retromae_ds/engine/ds_config.py",
             "        return cfg.precision\n",
             "        return \"fp32\" if cfg.precision == \"bf16\" else cfg.precision\n",
             [M + "test_trains_on_two_ranks_with_interval_checkpoints[zero2-bf16]"],
             "--precision bf16 silently resolved to fp32"),
    Mutation("bf16-section-never-enabled", "retromae_ds/engine/ds_config.py",
             "(\"bf16\", precision == \"bf16\")", "(\"bf16\", False)",
             [M + "test_trains_on_two_ranks_with_interval_checkpoints[zero2-bf16]"],
             "the DeepSpeed JSON's bf16 section is never enabled (the banner still says bf16)"),
    Mutation("export-encoder-only", "retromae_ds/engine/export.py",
             "model.save_pretrained(tmp / \"retromae\")", "model.lm.save_pretrained(tmp / \"retromae\")",
             [E + "test_export_from_zero3_loads_with_automodel_and_sentence_transformers",
              E + "test_dupmae_continues_from_the_export_with_its_decoder"],
             "export writes the encoder (MLM model) only, no decoder state, to EXPORT/retromae"),
    Mutation("sigterm-skips-a-batch", "retromae_ds/engine/trainer.py",
             "if stop:\n                    reason = stop",
             "if stop and self.sampler.next_global_batch(self.global_batch) is not None:\n                    reason = stop",
             [E + "test_sigterm_saves_and_exits_zero_then_the_same_command_continues_bit_for_bit"],
             "a stop on SIGTERM / time budget saves a sampler position one batch ahead"),
    Mutation("stop-saves-previous-step", "retromae_ds/engine/trainer.py",
             "return self.checkpointer.save(self.state.step, reason,",
             "return self.checkpointer.save(self.state.step - 1, reason,",
             [E + "test_sigterm_saves_and_exits_zero_then_the_same_command_continues_bit_for_bit"],
             "checkpoints (the stop checkpoint among them) are tagged one step early"),
    Mutation("time-budget-ignored", "retromae_ds/engine/trainer.py",
             "self.budget = config_mod.parse_time_budget(cfg.time_budget)", "self.budget = None",
             [E + "test_time_budget_stops_with_a_checkpoint_and_exit_0"],
             "--time-budget never stops the run"),
    Mutation("grad-scaled-by-world", "retromae_ds/engine/trainer.py",
             "engine.backward(objective)", "engine.backward(objective * world)",
             [E + "test_zero2_two_ranks_equal_single_process"],
             "gradients scale with the world size (Adam and clipping hide it in the losses)"),
    Mutation("grouping-cut-for-current-batch", "retromae_ds/engine/trainer.py",
             "LengthGrouping(batch=self.sched.batch,", "LengthGrouping(batch=self.global_batch,",
             ["tests/test_length_grouping.py::test_grouped_run_resumes_on_another_world_size_with_the_same_order"],
             "length groups follow the current global batch: a resume with another world size changes the order"),
    Mutation("resume-on-other-data", "retromae_ds/engine/checkpointer.py",
             "self._check_compatible(point, fingerprints)", "pass",
             [E + "test_resume_refuses_a_checkpoint_trained_on_different_data"],
             "resuming a checkpoint trained on different data is not refused"),
    Mutation("data-weights-ignored", "retromae_ds/engine/build.py",
             "weights = cfg.data_weights or [float(len(d)) for d in datasets]",
             "weights = [float(len(d)) for d in datasets]",
             [E + "test_data_weights_set_the_blend"],
             "--data-weights ignored (blend proportional to size)"),
    Mutation("objective-ignored", "retromae_ds/engine/build.py",
             "rcfg = RetroMAEConfig(objective=cfg.objective,", "rcfg = RetroMAEConfig(objective=\"retromae\",",
             [E + "test_dupmae_continues_from_the_export_with_its_decoder",
              E + "test_mlm_objective_trains_the_encoder_only"],
             "--objective dupmae / mlm builds a plain retromae model"),
    Mutation("max-seq-len-unchecked", "retromae_ds/engine/build.py",
             "if max_len + offset > positions:", "if False:",
             ["tests/test_model.py::test_build_model_applies_extend_positions"],
             "--max-seq-len beyond the model's positions is not refused"),
    Mutation("resume-forgets-data-position", "retromae_ds/engine/trainer.py",
             "self.sampler.load_state_dict(point.sampler_state)", "pass",
             [E + "test_resume_after_kill9_is_bitwise_exact_zero2"],
             "a resume restarts the data order (control: guarded before issue 14)"),
    Mutation("bf16-optimizer-state-unlabelled", "retromae_ds/engine/checkpoint.py",
             "optim[ZERO_STAGE] = 1", "pass",
             [M + "test_export_equals_deepspeeds_consolidation[zero1-bf16]"],
             "ZeRO-1 + bf16 (DeepSpeed's BF16_Optimizer) checkpoints saved without the stage label: "
             "DeepSpeed cannot consolidate them (export, resume with a new world size)"),
    Mutation("reshard-masters-rounded", "retromae_ds/engine/trainer.py",
             "ckpts.restore_masters(consolidated)", "pass",
             [M + "test_resumes_at_a_new_world_size_from_the_exact_fp32_masters[zero2-bf16]"],
             "a bf16 resume with a new world size keeps DeepSpeed's masters cloned from the 16-bit weights"),
    Mutation("unshared-output-dir-unchecked", "retromae_ds/engine/checkpointer.py",
             "unshared = _unseen_files(reports, self.cfg.output_dir)", "unshared = None",
             [F + "test_a_node_local_output_dir_fails_at_the_first_save_naming_host_and_path"],
             "a rank's checkpoint file that rank 0 cannot see goes unnoticed (a node-local --output-dir)"),
    Mutation("fp16-overflow-counts-as-nan", "retromae_ds/engine/trainer.py",
             "state.loss_scale_skips += 1\n            skipped = False", "state.loss_scale_skips += 1",
             [F + "test_fp16_loss_scale_search_is_not_a_nonfinite_stop_but_nan_losses_are"],
             "fp16 loss-scale overflow skips count as NaN/inf steps (a healthy fp16 run stops with exit 3)"),
    # --- the model's math (tests/test_math_reference.py) ---
    Mutation("math-attention-scale-1-over-d", "retromae_ds/model/decoder.py",
             "dropout_p=dropout)", "dropout_p=dropout, scale=1.0 / q.shape[-1])",
             [R + "test_decoder_layer_equals_the_plain_reference"],
             "the decoder's attention scores scaled by 1/head_dim instead of 1/sqrt(head_dim)"),
    Mutation("math-rotary-on-values", "retromae_ds/model/decoder.py",
             "q, k = self.rotary(q), self.rotary(k)", "q, k, v = self.rotary(q), self.rotary(k), self.rotary(v)",
             [R + "test_shifting_every_position_leaves_the_decoder_output_unchanged",
              R + "test_decoder_layer_equals_the_plain_reference"],
             "rotary positions applied to the values too (outputs depend on absolute positions)"),
    Mutation("math-rotary-keys-not-rotated", "retromae_ds/model/decoder.py",
             "q, k = self.rotary(q), self.rotary(k)", "q, k = self.rotary(q), k",
             [R + "test_shifting_every_position_leaves_the_decoder_output_unchanged",
              R + "test_decoder_layer_equals_the_plain_reference"],
             "rotary positions on the queries only: scores depend on the query's absolute position"),
    Mutation("math-mask-diagonal-off-by-one", "retromae_ds/data/masking.py",
             "visible.diagonal(dim1=1, dim2=2).fill_(False)", "visible.diagonal(offset=1, dim1=1, dim2=2).fill_(False)",
             [R + "test_decoder_mask_rows_are_the_defined_ones"],
             "decoder row i hides position i + 1 instead of itself"),
    Mutation("math-mask-cls-can-be-drawn", "retromae_ds/data/masking.py",
             "hidden = pool.gather(2, word_of[:, None, :].expand(batch, members, seq_len)) & real[:, None, :]",
             "hidden = pool.gather(2, word_of[:, None, :].expand(batch, members, seq_len)) & visible_cols[:, None, :]",
             [R + "test_decoder_mask_rows_are_the_defined_ones"],
             "the pooled decoder draw can hide [CLS] and [SEP] (with the first / last word)"),
    Mutation("math-mask-padding-visible", "retromae_ds/data/masking.py",
             "pool_visible = torch.cat([hidden.logical_not_() & visible_cols[:, None, :],",
             "pool_visible = torch.cat([hidden.logical_not_(),",
             [R + "test_decoder_mask_rows_are_the_defined_ones"],
             "decoder rows may attend to padding columns"),
    Mutation("math-mask-budget-without-specials", "retromae_ds/data/masking.py",
             "dec_budget = torch.round(n_total * self.decoder_mask_ratio)",
             "dec_budget = torch.round(lengths.to(torch.float64) * self.decoder_mask_ratio)",
             [R + "test_decoder_mask_rows_are_the_defined_ones"],
             "the decoder draw's budget counts n tokens instead of n + 2 ([CLS]/[SEP], as the reference)"),
    Mutation("math-ce-counts-ignored-rows", "retromae_ds/model/heads.py",
             "loss = loss - torch.where(valid[start:start + step], picked, 0).sum()", "loss = loss - picked.sum()",
             [R + "test_summed_cross_entropy_equals_a_plain_row_loop"],
             "the summed cross-entropy loses its -100 filter (ignored rows score id 0)"),
    Mutation("math-ce-gradient-on-ignored-rows", "retromae_ds/model/heads.py",
             "scale = torch.where(valid[start:start + step, None], grad, 0)", "scale = grad",
             [R + "test_summed_cross_entropy_equals_a_plain_row_loop"],
             "the cross-entropy's backward gives rows with target -100 a gradient"),
    Mutation("math-static-rows-from-the-end", "retromae_ds/model/heads.py",
             "index = torch.argsort(ignored, stable=True)[:capacity]",
             "index = torch.argsort(ignored, stable=True)[-capacity:]",
             [R + "test_labelled_rows_are_the_labelled_positions_in_order",
              R + "test_labelled_rows_loss_equals_a_plain_loop_chunked_or_not"],
             "the static row selection takes the last `capacity` rows of the sort (filler first, labelled lost)"),
    Mutation("math-chunked-loss-keeps-last-chunk", "retromae_ds/model/heads.py",
             "loss, correct = loss + part_loss, correct + part_correct",
             "loss, correct = part_loss, correct + part_correct",
             [R + "test_labelled_rows_loss_equals_a_plain_loop_chunked_or_not"],
             "the chunked head's loss is the last chunk's instead of the sum over chunks"),
    Mutation("math-pool-chunks-keep-the-min", "retromae_ds/model/heads.py",
             "torch.where(part[0] > pooled, part[0], pooled)", "torch.where(part[0] < pooled, part[0], pooled)",
             [R + "test_pooled_and_labelled_loss_equals_plain_loops"],
             "DupMAE's chunked max-pool merges chunks with a min"),
    Mutation("math-bow-pools-cls-not-last", "retromae_ds/model/retromae.py",
             "keep[:, 0] = False  # the reference pools positions 1.. (not [CLS])", "keep[:, -1] = False",
             [R + "test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow"],
             "DupMAE's max-pool position set: [CLS] pooled, the last position left out"),
    Mutation("math-bow-targets-summed", "retromae_ds/model/heads.py", 'reduce="amax")', 'reduce="sum")',
             [R + "test_bag_of_words_targets_equal_a_plain_loop"],
             "bag-of-words targets sum the weights of repeated ids (the reference does not)"),
    Mutation("math-bow-loss-mean-over-vocabulary", "retromae_ds/model/heads.py",
             "(targets * torch.log_softmax(pooled.float(), dim=-1)).sum(-1).mean()",
             "(targets * torch.log_softmax(pooled.float(), dim=-1)).mean(-1).mean()",
             [R + "test_bag_of_words_loss_equals_a_plain_loop"],
             "the bag-of-words loss averages over the vocabulary instead of summing"),
    Mutation("math-bow-weight-ignored", "retromae_ds/model/retromae.py",
             "loss = loss + cfg.bow_loss_weight * bow_loss", "loss = loss + bow_loss",
             [R + "test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow"],
             "DupMAE's total loss ignores bow_loss_weight"),
    Mutation("math-decoder-key-value-shifted", "retromae_ds/model/retromae.py",
             "embed(input_ids=decoder_input_ids)[:, 1:]], dim=1)",
             "embed(input_ids=decoder_input_ids)[:, :-1]], dim=1)",
             [R + "test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow"],
             "the decoder's key/value stream is the token embeddings shifted by one position"),
    Mutation("math-decoder-static-slice-misaligned", "retromae_ds/model/retromae.py",
             "heads.labelled_rows_loss(head, decoded[:, 1:-1], inner,",
             "heads.labelled_rows_loss(head, decoded[:, :-2], inner,",
             [R + "test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow"],
             "static shapes: the decoder rows scored against the labels of the next position"),
    Mutation("math-decoder-loss-over-encoder-tokens", "retromae_ds/model/retromae.py",
             "decoder_loss = dec_sum / decoder_tokens.clamp(min=1)",
             "decoder_loss = dec_sum / encoder_tokens.clamp(min=1)",
             [R + "test_forward_loss_is_encoder_plus_decoder_plus_weighted_bow"],
             "the decoder loss is averaged over the encoder's masked tokens"),
    # --- failures at scale (issue 27: tests/test_head_calls.py, tests/test_zero_failures.py) ---
    Mutation("eval-heads-unchunked", "retromae_ds/model/heads.py",
             "calls = head_calls(count, chunk_size, max_rows)\n",
             "calls = head_calls(count, chunk_size, max_rows) if torch.is_grad_enabled() else 1\n",
             [HC + "test_cls_gain_never_projects_more_rows_than_the_chunk"],
             "--ce-chunk-size ignored under no_grad: cls_gain projects every row at once"),
    Mutation("head-calls-follow-the-batch", "retromae_ds/model/heads.py",
             "return max(1, -(-max(rows, max_rows or 0) // chunk_size))",
             "return max(1, -(-rows // chunk_size))",
             [HC + "test_head_calls_per_forward_do_not_depend_on_the_batch",
              Z + "test_zero3_chunked_heads_on_grouped_ragged_batches"],
             "the number of head chunks follows each rank's rows (ZeRO-3 ranks gather a different number of times)"),
    Mutation("pool-slices-follow-the-batch", "retromae_ds/model/heads.py",
             "span = max(length, max_length or 0) if chunk_size else length",
             "span = length",
             [HC + "test_head_calls_per_forward_do_not_depend_on_the_batch"],
             "DupMAE's chunked head follows each rank's width"),
    Mutation("cls-gain-cut-at-training-length", "retromae_ds/engine/trainer.py",
             "max_tokens=min(self.block_cap, self.eval_max_length - 2))",
             "max_tokens=self.block_cap)",
             [Z + "test_zero3_chunked_heads_on_grouped_ragged_batches"],
             "cls_gain cuts held-out blocks at the training length, not --eval-max-length"),
    Mutation("zero1-frozen-decoder-lost", "retromae_ds/engine/checkpoint.py",
             "    return _with_frozen_parameters(path, state)\n",
             "    return state\n",
             [Z + "test_zero1_mlm_keeps_the_frozen_decoder_for_export_and_a_new_world_size"],
             "ZeRO-1 consolidation without the frozen decoder of --objective mlm (export fails)"),
    Mutation("grouped-loss-as-before", "retromae_ds/engine/trainer.py",
             "    return objective, [objective, out.encoder_loss * weight, decoder * weight, bow]\n",
             "    return out.loss * weight, [out.loss, out.encoder_loss, decoder, bow]\n",
             ["tests/test_length_grouping.py::test_a_grouped_step_optimizes_and_logs_the_token_weighted_objective"],
             "grouped steps: the bag-of-words loss token-weighted, the log the unweighted mean of micro-batch means"),
    # issue 29: retrieval on the user's data
    Mutation("ties-in-ascending-id-order", "retromae_ds/retrieval/metrics.py",
             "key=doc_ids.__getitem__, reverse=True)", "key=doc_ids.__getitem__)",
             [RM + "test_metrics_equal_trec_eval_with_graded_qrels_and_ties"],
             "equal scores ranked by ascending document id (trec_eval ranks them descending)"),
    Mutation("ideal-dcg-from-found", "retromae_ds/retrieval/metrics.py",
             "/ _ideal_dcg(judged, 10)}", "/ np.maximum((np.sort(gains, 1)[:, ::-1][:, :10] * discounts[:10]).sum(1), 1e-12)}",
             [RM + "test_metrics_equal_trec_eval_with_graded_qrels_and_ties"],
             "nDCG's ideal DCG from the relevant documents the ranking found, not from all judged ones"),
    Mutation("search-blocks-drop-best", "retromae_ds/retrieval/search.py",
             "scores = torch.cat([best_scores, scores], 1)", "scores = torch.cat([best_scores[:, :0], scores], 1)",
             [RM + "test_chunked_search_equals_one_full_sort"],
             "each block of passages replaces the running top-k instead of merging with it"),
    Mutation("probe-scores-the-start-again", "retromae_ds/retrieval/probe.py",
             "after = score_set(tuned, tuned_tokenizer,", "after = score_set(load_encoder(model_dir)[0], tuned_tokenizer,",
             [RE + "test_probe_fine_tune_beats_its_start_and_is_deterministic"],
             "the after-fine-tune evaluation scores the starting encoder"),
    Mutation("cpu-start-builds-the-shm-op", "retromae_ds/engine/distributed.py",
             "        _skip_inference_shm_op(deepspeed, accel)\n", "",
             ["tests/test_distributed_env.py::test_timeout_reaches_the_groups_deepspeed_creates"],
             "a CPU start JIT-compiles DeepSpeed's inference-only shm op (45-150 s per environment)"),
    Mutation("unused-muon-loaded", "retromae_ds/engine/trainer.py",
             "        skip_unused_muon(ds_json)\n", "",
             [E + "test_zero2_two_ranks_equal_single_process"],
             "every rank's start imports DeepSpeed's Muon and compiles nothing with it (~1 s of CPU per rank)"),
    Mutation("muon-stand-in-answers-import-probes", "retromae_ds/engine/unused_muon.py",
             "if name.startswith(\"__\"):", "if False:",
             ["tests/test_unused_muon.py::test_a_run_without_muon_gets_stand_ins_and_any_other_name_the_real_module"],
             "the import system's __path__ probe loads DeepSpeed's real Muon through the stand-in"),
    Mutation("early-stopping-keeps-the-last-state", "retromae_ds/retrieval/probe.py",
             '"load_best_model_at_end": True,', '"load_best_model_at_end": False,',
             ["tests/test_retrieval_eval.py::test_early_stopping_keeps_the_best_held_out_state"],
             "a full fine-tune with --val-pairs is scored in its last state, not its best held-out one"),
]

IGNORE = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "*.pyc")
TOP_LEVEL_SKIP = {"runs", "data", ".git"}

# Runs inside the copy: fails unless the package under test is the copy's, then runs pytest.
PYTEST_WRAPPER = (
    "import sys, pathlib, retromae_ds, pytest\n"
    "root = pathlib.Path(sys.argv[1]).resolve()\n"
    "here = pathlib.Path(retromae_ds.__file__).resolve()\n"
    "if not here.is_relative_to(root):\n"
    "    print(f'mutation_check: retromae_ds imported from {here}, not from the copy {root}', flush=True)\n"
    "    sys.exit(99)\n"
    "sys.exit(pytest.main(sys.argv[2:]))\n"
)


def copy_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for entry in src.iterdir():
        if entry.name in TOP_LEVEL_SKIP or entry.name.endswith(".egg-info") or entry.name == "__pycache__":
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, dst / entry.name, ignore=IGNORE, symlinks=True)
        else:
            shutil.copy2(entry, dst / entry.name)


def run_tests(copy: Path, tests: list[str], timeout: float, log: Path, stop_first: bool = True
              ) -> tuple[str, int, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + os.pathsep + env.get("PYTHONPATH", "")
    basetemp = copy / ".mutation_tmp"
    shutil.rmtree(basetemp, ignore_errors=True)
    cmd = [sys.executable, "-c", PYTEST_WRAPPER, str(copy), *(["-x"] if stop_first else []), "-q", "-p",
           "no:cacheprovider", f"--basetemp={basetemp}", *tests]
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            return "TIMEOUT", -9, time.monotonic() - t0
    return {0: "PASSED", 1: "FAILED"}.get(rc, "ERROR"), rc, time.monotonic() - t0


def failing_tests(log: Path) -> list[str]:
    return [line.split(" - ")[0].replace("FAILED ", "").replace("ERROR ", "")
            for line in log.read_text(errors="replace").splitlines() if line.startswith(("FAILED ", "ERROR "))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutations only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmodified-copy run")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run (default 1200)")
    ap.add_argument("--keep", action="store_true", help="keep the copy and the logs")
    ap.add_argument("--all-tests", action="store_true",
                    help="run every listed test of a mutation (default: stop at the first failure, -x)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    ap.add_argument("--source", type=Path, default=REPO,
                    help="the tree to copy (default: this checkout's working tree); e.g. an export of a "
                         "commit when others are editing the checkout")
    args = ap.parse_args()

    selected = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTATIONS}
        if unknown:
            ap.error(f"unknown mutation ids: {sorted(unknown)}")
        selected = [m for m in MUTATIONS if m.id in args.only]
    if args.list:
        for m in selected:
            print(f"{m.id:30s} {m.file}: {m.what}\n{'':30s} tests: {' '.join(t.split('::')[-1] for t in m.tests)}")
        return 0

    work = Path(tempfile.mkdtemp(prefix="mutation_check_"))
    copy, logs = work / "repo", work / "logs"
    copy_tree(args.source.resolve(), copy)
    logs.mkdir()
    print(f"copy of {args.source.resolve()} at {copy}; logs in {logs}", flush=True)
    results = []
    ok = True
    if not args.no_baseline:
        tests = list(dict.fromkeys(t for m in selected for t in m.tests))
        status, rc, secs = run_tests(copy, tests, args.timeout * 2, logs / "baseline.log")
        print(f"baseline (unmodified copy, {len(tests)} tests): {status} in {secs:.0f}s", flush=True)
        results.append({"id": "baseline", "status": status, "seconds": round(secs)})
        if status != "PASSED":
            print((logs / "baseline.log").read_text(errors="replace")[-4000:])
            print("baseline failed: mutation results would mean nothing; stopping.")
            args.keep = True
            ok = False
            selected = []

    for m in selected:
        path = copy / m.file
        original = path.read_text()
        count = original.count(m.old)
        if count != 1:
            status = "ERROR"
            detail = f"snippet found {count} times in {m.file} (must be exactly once): {m.old!r}"
            print(f"{m.id}: ERROR {detail}", flush=True)
            results.append({"id": m.id, "status": status, "detail": detail})
            ok = False
            continue
        path.write_text(original.replace(m.old, m.new))
        try:
            log = logs / f"{m.id}.log"
            status, rc, secs = run_tests(copy, m.tests, args.timeout, log, stop_first=not args.all_tests)
        finally:
            path.write_text(original)
        verdict = {"FAILED": "CAUGHT", "PASSED": "MISSED"}.get(status, status)
        failed = failing_tests(log) if verdict == "CAUGHT" else []
        if verdict != "CAUGHT":
            ok = False
            args.keep = True
            if verdict == "ERROR":
                print(log.read_text(errors="replace")[-3000:])
        print(f"{m.id}: {verdict} in {secs:.0f}s {' '.join(t.split('::')[-1] for t in failed)}", flush=True)
        results.append({"id": m.id, "status": verdict, "seconds": round(secs), "failed": failed,
                        "what": m.what, "file": m.file})

    print("\n| mutation | file | result | seconds | failing test |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        failed = ", ".join(t.split("::")[-1] for t in r.get("failed", [])) or r.get("detail", "")
        print(f"| {r['id']} | {r.get('file', '')} | {r['status']} | {r.get('seconds', '')} | {failed} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

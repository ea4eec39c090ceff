#!/usr/bin/env python
"""launch/pretrain.py with test instrumentation: what the trainer really ran, read from its objects.

Used by tests/helpers/engine_runs.py in place of launch/pretrain.py (same flags, same product code: this file
only wraps `deepspeed.initialize`, `build.load_data` and the engine's `step`). With the environment
variable RETROMAE_TEST_PROBE=DIR set, each rank writes DIR/probe_rank{R}.json at exit:

- engine: what DeepSpeed runs (bf16/fp16 enabled, the dtype of the module's parameters, ZeRO stage,
  gradient clipping) and whether the module has activation checkpointing on;
- forwards: training forward calls (module in train mode, grad enabled) of the encoder, of its first
  layer and of the decoder layer (counted on the first Linear inside each). With activation
  checkpointing each layer runs twice per micro-batch (forward + recomputation in backward), without
  it once;
- blocks: every training block the trainer fetched (token ids), in order;
- steps: optimizer steps taken in this process;
- engine.compiled_modules: modules whose calls run through torch.compile (--compile).

RETROMAE_TEST_PROBE_INIT=1 also saves the module's state dict as handed to deepspeed.initialize
(DIR/init_state.pt, rank 0): the starting weights after --model / --resume loading.
RETROMAE_TEST_SIGTERM_AFTER=K sends SIGTERM to this process group during optimizer step K of this
process (counted from 1 after any resume): the trainer's own signal path, at a deterministic step.
RETROMAE_TEST_SYNCS=N records the operations that would make the host wait for a GPU
(scripts/sync_watch.py) during steps 1..N, per step, into the probe's "syncs": a step is the time from
one `next_global_batch` call to the next, so it includes that step's logging. The mask generator
takes its accelerator path (fixed greedy rounds), as it would on a GPU.
RETROMAE_TEST_PROBE_MASTERS=1 (with RETROMAE_TEST_PROBE=DIR): at the first call of `engine.step` in
this process, before that step runs, every rank reads the optimizer's fp32 master weights
(`deepspeed.utils.safe_get_full_fp32_param` of each `engine.module.named_parameters()`, a collective
under ZeRO-3) and rank 0 saves {name: tensor on the CPU} to DIR/masters.pt (a parameter without fp32
masters is saved as None). Tied parameters appear once (named_parameters drops duplicates).

The hooks below work with or without RETROMAE_TEST_PROBE:
RETROMAE_TEST_FP16_ON_CPU=1 lets fp16 run on CPU ranks: the accelerator's `is_fp16_supported` answers
True and its `supported_dtypes` include torch.float16 (DeepSpeed otherwise refuses: "Type fp16 is not
supported on your device."), and `retromae_ds.engine.ds_config.resolve_precision` resolves --precision fp16
as it would on a GPU (the product refuses fp16 on "cpu"). It checks configuration, checkpoint layout, resume and
consolidation under fp16, not fp16 kernels (those run on a GPU only).
RETROMAE_TEST_HIDE_SAVED_FILES_RANK=R: on rank R, every checkpoint file this rank saves through the
trainer's checkpoint engine (`retromae_ds.engine.checkpoint.ManifestingCheckpointEngine.save`) is renamed
to PATH.node-local right after it is written, while the saver's records (written sizes and hashes) stay
as they are: what rank 0 sees when rank R writes to a node-local --output-dir.
RETROMAE_TEST_FAIL_ON_RANK0=consolidate|export: on rank 0 only, the consolidation of the fp32 weights
(`retromae_ds.engine.checkpoint.consolidated_fp32_state` and DeepSpeed's
`deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, also where another module of
retromae_ds imported them by name) or the export (`retromae_ds.engine.export.export_checkpoint`, likewise)
raises RuntimeError("injected failure on rank 0").
RETROMAE_TEST_NONFINITE_STEPS=S1,S2,...: the training loss is NaN at these steps (the trainer's step
counter before the step, 0-based), in every micro-batch or, with RETROMAE_TEST_NONFINITE_MICRO=K, only in
micro-batch K of the step: what a bad batch or an overflow does, at a deterministic place.
RETROMAE_TEST_SIGTERM_AT_SAVE=N: SIGTERM this process right after the interval checkpoint of step N is
saved (a signal that arrives during a save).
RETROMAE_TEST_RECOVERY_COPY_FAILS=1: on rank 0, DeepSpeed's copy of zero_to_fp32.py into each checkpoint
(`shutil.copyfile` as deepspeed.runtime.engine imported it) raises ENOSPC, as on a disk that filled up
after the optimizer files were written.
RETROMAE_TEST_SYNC_FREE=1: the mask generator takes the accelerators' sync-free path on the CPU (the
heads' static row capacity), while batches keep their own widths (unlike --static-shapes).
With RETROMAE_TEST_PROBE, `head_rows` records the rows of every call of the MLM head, by mode
("train"/"eval"), backward recomputations included, and `eval_width` the widest input the encoder got
in evaluation (eval mode).
"""

from __future__ import annotations

import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers/ -> root
sys.path.insert(0, REPO)

PROBE = os.environ.get("RETROMAE_TEST_PROBE", "")
RECORD: dict = {"engine": None, "forwards": {}, "blocks": [], "steps": 0, "module": None, "syncs": [],
                "head_rows": {}}
SYNC_STEPS = int(os.environ.get("RETROMAE_TEST_SYNCS", "0"))
PROBE_MASTERS = bool(os.environ.get("RETROMAE_TEST_PROBE_MASTERS"))
FP16_ON_CPU = bool(os.environ.get("RETROMAE_TEST_FP16_ON_CPU"))
HIDE_SAVED_FILES_RANK = os.environ.get("RETROMAE_TEST_HIDE_SAVED_FILES_RANK", "")
FAIL_ON_RANK0 = os.environ.get("RETROMAE_TEST_FAIL_ON_RANK0", "")
RECOVERY_COPY_FAILS = bool(os.environ.get("RETROMAE_TEST_RECOVERY_COPY_FAILS"))
NONFINITE_STEPS = {int(s) for s in os.environ.get("RETROMAE_TEST_NONFINITE_STEPS", "").split(",") if s}
NONFINITE_MICRO = int(os.environ.get("RETROMAE_TEST_NONFINITE_MICRO", "-1"))
SIGTERM_AT_SAVE = int(os.environ.get("RETROMAE_TEST_SIGTERM_AT_SAVE", "0"))
SYNC_FREE = bool(os.environ.get("RETROMAE_TEST_SYNC_FREE"))
INJECTED_FAILURE = "injected failure on rank 0"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RecordingDataset:
    """Transparent pass-through of the training dataset that records each fetched block (the trainer
    asks a blend for more than len/getitem: every other attribute is the inner dataset's)."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes = getattr(inner, "sizes", None)

    def __getattr__(self, name):  # everything else (a blend's epoch_samples, samples_per_epoch, ...)
        return getattr(self.inner, name)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        block = self.inner[i]
        RECORD["blocks"].append([int(t) for t in block])
        return block


def first_linear(module):
    import torch

    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear))


def _install() -> None:
    import deepspeed
    import torch

    from retromae_ds.engine import build

    original_load_data = build.load_data

    def load_data(cfg, tokenizer):
        bundle = original_load_data(cfg, tokenizer)
        bundle.train = _RecordingDataset(bundle.train)
        return bundle

    build.load_data = load_data

    original_initialize = deepspeed.initialize

    def counter(name):
        def hook(module, args, output):
            if module.training and torch.is_grad_enabled():
                RECORD["forwards"][name] = RECORD["forwards"].get(name, 0) + 1
        return hook

    def initialize(*args, **kwargs):
        model = kwargs.get("model")
        rank = int(os.environ.get("RANK", "0"))
        if os.environ.get("RETROMAE_TEST_PROBE_INIT") and rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                       os.path.join(PROBE, "init_state.pt"))
        # Hooks on a Linear inside each layer: torch's checkpoint recomputation calls the checkpointed
        # module without its own forward hooks, but its submodules' hooks fire.
        model.lm.base_model.register_forward_hook(counter("encoder"))
        first_linear(model.lm.base_model.encoder.layer[0]).register_forward_hook(counter("encoder_layer0"))
        first_linear(model.c_head).register_forward_hook(counter("decoder_layer"))
        head = getattr(model.lm, model._head_names[0])  # the MLM head's first part: rows per call, by mode

        def head_rows(module, args):
            rows = int(args[0].reshape(-1, args[0].shape[-1]).shape[0])
            RECORD["head_rows"].setdefault("train" if module.training else "eval", []).append(rows)

        head.register_forward_pre_hook(head_rows)

        def eval_width(module, args, kwargs):  # the widest input the encoder evaluated
            ids = kwargs.get("input_ids", args[0] if args else None)
            if not module.training and ids is not None:
                RECORD["eval_width"] = max(RECORD.get("eval_width", 0), int(ids.shape[1]))

        model.lm.base_model.register_forward_pre_hook(eval_width, with_kwargs=True)
        result = original_initialize(*args, **kwargs)
        engine = result[0]
        module = engine.module
        RECORD["engine"] = {
            "bf16": bool(engine.bfloat16_enabled()), "fp16": bool(engine.fp16_enabled()),
            "param_dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
            "zero_stage": int(engine.zero_optimization_stage()),
            "gradient_clipping": float(engine.gradient_clipping()),
            "activation_checkpointing": bool(module.is_gradient_checkpointing),
            "hf_gradient_checkpointing": bool(getattr(module.lm, "is_gradient_checkpointing", False)),
            "compiled_modules": sum(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()),
        }
        sigterm_after = int(os.environ.get("RETROMAE_TEST_SIGTERM_AFTER", "0"))
        original_step = engine.step
        masters_saved = []  # RETROMAE_TEST_PROBE_MASTERS: once, at the first call

        def step(*a, **kw):
            if PROBE_MASTERS and not masters_saved:
                masters_saved.append(True)
                _save_masters(engine)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                RECORD["steps"] += 1
                if RECORD["steps"] == sigterm_after:
                    os.kill(os.getpid(), signal.SIGTERM)
            return original_step(*a, **kw)

        engine.step = step
        return result

    deepspeed.initialize = initialize
    if SYNC_STEPS:
        _watch_syncs()


def _save_masters(engine) -> None:
    """The optimizer's fp32 master weights as they are now, by parameter name (RETROMAE_TEST_PROBE_MASTERS)."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # every rank: an all-reduce / all-gather inside
        masters[name] = None if full is None else full.detach().cpu().clone()
    if _rank() == 0:
        torch.save(masters, os.path.join(PROBE, "masters.pt"))


def _fp16_on_cpu() -> None:
    """RETROMAE_TEST_FP16_ON_CPU: DeepSpeed and the trainer accept fp16 on CPU ranks."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from retromae_ds.engine import ds_config

    accelerator = type(get_accelerator())
    original_dtypes = accelerator.supported_dtypes

    def supported_dtypes(self):
        dtypes = list(original_dtypes(self))
        return dtypes if torch.float16 in dtypes else dtypes + [torch.float16]

    accelerator.is_fp16_supported = lambda self: True
    accelerator.supported_dtypes = supported_dtypes
    original_resolve = ds_config.resolve_precision

    def resolve_precision(cfg, device_type, bf16_supported):
        if cfg.precision == "fp16" and device_type == "cpu":
            return original_resolve(cfg, "cuda", bf16_supported)
        return original_resolve(cfg, device_type, bf16_supported)

    ds_config.resolve_precision = resolve_precision


def _hide_saved_files(rank: int) -> None:
    """RETROMAE_TEST_HIDE_SAVED_FILES_RANK: this rank's checkpoint files vanish from where rank 0 looks."""
    from retromae_ds.engine.checkpoint import ManifestingCheckpointEngine

    if _rank() != rank:
        return
    original_save = ManifestingCheckpointEngine.save

    def save(self, state_dict, path):
        original_save(self, state_dict, path)
        if os.path.exists(path):
            os.replace(path, path + ".node-local")

    ManifestingCheckpointEngine.save = save


def _replace_everywhere(module, name: str, replacement) -> None:
    """Set module.name and every name in an imported retromae_ds module bound to the same object."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    for mod_name, mod in list(sys.modules.items()):
        if mod is not None and mod_name.split(".")[0] == "retromae_ds":
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, replacement)


def _fail_on_rank0(what: str) -> None:
    """RETROMAE_TEST_FAIL_ON_RANK0: rank 0's consolidation or export raises."""
    if what not in ("consolidate", "export"):
        raise SystemExit(f"RETROMAE_TEST_FAIL_ON_RANK0={what}: expected consolidate or export")
    if _rank() != 0:
        return
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    import retromae_ds.engine.checkpoint as checkpoint
    import retromae_ds.engine.export as export
    import retromae_ds.engine.trainer  # noqa: F401  (so names it imported are replaced too)

    def fail(*args, **kwargs):
        raise RuntimeError(INJECTED_FAILURE)

    if what == "consolidate":
        targets = [(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint")]
        if hasattr(checkpoint, "consolidated_fp32_state"):
            targets.append((checkpoint, "consolidated_fp32_state"))
    else:
        targets = [(export, "export_checkpoint")]
    for module, name in targets:
        _replace_everywhere(module, name, fail)


def _recovery_copy_fails() -> None:
    """RETROMAE_TEST_RECOVERY_COPY_FAILS: rank 0's copy of DeepSpeed's recovery script hits a full disk."""
    import errno

    import deepspeed.runtime.engine as ds_engine

    if _rank() != 0:
        return

    def copyfile(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    ds_engine.copyfile = copyfile


def _nonfinite_losses() -> None:
    """RETROMAE_TEST_NONFINITE_STEPS / _MICRO: the model's training loss becomes NaN at those steps."""
    import torch

    from retromae_ds.engine.trainer import Trainer
    from retromae_ds.model.retromae import RetroMAEForPretraining

    where = {"step": -1, "micro": 0}
    original_step, original_forward = Trainer.train_step, RetroMAEForPretraining.forward

    def train_step(self):
        where["step"], where["micro"] = self.state.step, 0
        return original_step(self)

    def forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if self.training and torch.is_grad_enabled():  # a training micro-batch, not an evaluation
            if where["step"] in NONFINITE_STEPS and NONFINITE_MICRO in (-1, where["micro"]):
                out.loss = out.loss * float("nan")
            where["micro"] += 1
        return out

    Trainer.train_step = train_step
    RetroMAEForPretraining.forward = forward


def _sigterm_at_save(step: int) -> None:
    """RETROMAE_TEST_SIGTERM_AT_SAVE: a SIGTERM right after the interval save of `step`."""
    from retromae_ds.engine.checkpointer import Checkpointer

    original_save = Checkpointer.save

    def save(self, at_step, reason, *args, **kwargs):
        path = original_save(self, at_step, reason, *args, **kwargs)
        if at_step == step and reason == "interval":
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    Checkpointer.save = save


def _install_independent_hooks() -> None:
    if SYNC_FREE:
        from retromae_ds.data.masking import MaskGenerator

        MaskGenerator.sync_free = True  # the accelerators' static head rows, without --static-shapes' widths
    if FP16_ON_CPU:
        _fp16_on_cpu()
    if HIDE_SAVED_FILES_RANK:
        _hide_saved_files(int(HIDE_SAVED_FILES_RANK))
    if FAIL_ON_RANK0:
        _fail_on_rank0(FAIL_ON_RANK0)
    if RECOVERY_COPY_FAILS:
        _recovery_copy_fails()
    if NONFINITE_STEPS:
        _nonfinite_losses()
    if SIGTERM_AT_SAVE:
        _sigterm_at_save(SIGTERM_AT_SAVE)


def _watch_syncs() -> None:
    from retromae_ds.data.masking import MaskGenerator
    from retromae_ds.data.sampler import GlobalBatchSampler
    from scripts.sync_watch import SyncWatch

    MaskGenerator.sync_free = True
    watch = SyncWatch(cuda_debug=True)
    original = GlobalBatchSampler.next_global_batch
    original_peek = GlobalBatchSampler.peek_global_batch
    peeking = [False]

    def peek_global_batch(self, n):  # peeking calls next_global_batch inside: not a new step
        peeking[0] = True
        try:
            return original_peek(self, n)
        finally:
            peeking[0] = False

    def next_global_batch(self, n):
        if peeking[0]:
            return original(self, n)
        watch.window += 1  # the step about to run
        if watch.window == 1:
            watch.__enter__()
        elif watch.window == SYNC_STEPS + 1:
            watch.__exit__(None, None, None)
            RECORD["syncs"] = watch.records
        return original(self, n)

    GlobalBatchSampler.next_global_batch = next_global_batch
    GlobalBatchSampler.peek_global_batch = peek_global_batch


def main() -> int:
    if PROBE:
        os.makedirs(PROBE, exist_ok=True)
        _install()
    _install_independent_hooks()
    from retromae_ds.engine.trainer import run_cli

    rc = run_cli()
    if PROBE:
        import retromae_ds

        RECORD["module"] = retromae_ds.__file__
        RECORD["rc"] = rc
        # the modules DeepSpeed's Muon would load (retromae_ds/engine/unused_muon.py): a stand-in has no file
        RECORD["loaded"] = {name: getattr(sys.modules.get(name), "__file__", None) is not None for name in (
            "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon",
            "torch._inductor.compile_fx")}
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(PROBE, f"probe_rank{rank}.json"), "w") as f:
            json.dump(RECORD, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())

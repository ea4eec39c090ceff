#!/usr/bin/env python
"""launch/pretrain.py with test instrumentation: what the trainer really ran, read from its objects.

Used by tests/engine_runs.py in place of launch/pretrain.py (same flags, same product code: this file
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
(tests/sync_watch.py) during steps 1..N, per step, into the probe's "syncs": a step is the time from
one `next_global_batch` call to the next, so it includes that step's logging. The mask generator
takes its accelerator path (fixed greedy rounds), as it would on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROBE = os.environ.get("RETROMAE_TEST_PROBE", "")
RECORD: dict = {"engine": None, "forwards": {}, "blocks": [], "steps": 0, "module": None, "syncs": []}
SYNC_STEPS = int(os.environ.get("RETROMAE_TEST_SYNCS", "0"))


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

        def step(*a, **kw):
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


def _watch_syncs() -> None:
    from retromae_ds.data.masking import MaskGenerator
    from retromae_ds.data.sampler import GlobalBatchSampler
    from tests.sync_watch import SyncWatch

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
    from retromae_ds.engine.trainer import run_cli

    rc = run_cli()
    if PROBE:
        import retromae_ds

        RECORD["module"] = retromae_ds.__file__
        RECORD["rc"] = rc
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(PROBE, f"probe_rank{rank}.json"), "w") as f:
            json.dump(RECORD, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())

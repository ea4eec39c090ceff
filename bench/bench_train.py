"""Training-step throughput of RetroMAE under DeepSpeed, for a matrix of settings, in one process.

    python -m bench.bench_train --preset bert-base --seq-len 512 --micro-batch 32        # on a GPU
    python -m bench.bench_train --preset tiny --seq-len 128 --micro-batch 8               # on CPU

Each setting builds a fresh model (random init, the given size), wraps it with deepspeed.initialize,
runs warm-up steps, then times steps on random-token batches of full length. Prints one JSON object:
per setting tokens/s, TFLOPs per device, MFU (when the device's peak is known), peak memory, whether
every loss was finite, and ratios against the first setting (the baseline) measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

PRESETS = {
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}


def parse_settings(text: str) -> list[dict]:
    """'z2-bf16,z2-fp16,z3-bf16,z2-bf16-ac' -> [{'stage': 2, 'precision': 'bf16', 'ac': False}, ...].
    Suffixes: `ac` activation checkpointing; `bf16grads`: accumulate and reduce gradients in bf16
    instead of the trainer's fp32 default (what that default costs); `compile`: torch.compile the layers
    (--compile); `mbN`: micro-batch N instead of --micro-batch (the batch-size table)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("-")
        micro = next((int(p[2:]) for p in parts[2:] if p.startswith("mb") and p[2:].isdigit()), None)
        out.append({"name": item.strip(), "stage": int(parts[0].lstrip("z")), "precision": parts[1],
                    "ac": "ac" in parts[2:], "low_precision_grads": "bf16grads" in parts[2:],
                    "compile": "compile" in parts[2:], "micro_batch": micro})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=30522)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settings", default="z2-fp32,z3-fp32,z2-fp32-ac")
    ap.add_argument("--objective", default="retromae")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()

    from retromae_ds.engine.distributed import init_distributed

    dist = init_distributed()
    import deepspeed
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from retromae_ds.config import TrainConfig
    from retromae_ds.data.masking import MaskGenerator, collate_blocks, mask_rng
    from retromae_ds.engine.build import param_groups
    from retromae_ds.engine.ds_config import load_deepspeed_json, resolve_deepspeed_config
    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining
    from retromae_ds.monitor.throughput import Throughput

    device = dist.device
    hf = BertConfig(vocab_size=args.vocab_size, max_position_embeddings=max(512, args.seq_len),
                    **PRESETS[args.preset])
    # Word-piece-like continuation table: every 4th id continues a word, specials are word starts.
    continuation = torch.zeros(args.vocab_size, dtype=torch.bool)
    continuation[1000::4] = True
    specials = [0, 100, 101, 102, 103]
    masker = MaskGenerator(continuation, cls_id=101, sep_id=102, pad_id=0, mask_id=103,
                           vocab_size=args.vocab_size, special_ids=specials).to(device)
    rng = np.random.default_rng(0)
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
               "world_size": dist.world_size, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
               "settings": {}}
    for setting in parse_settings(args.settings):
        torch.manual_seed(0)
        model = RetroMAEForPretraining(BertForMaskedLM(hf), RetroMAEConfig(objective=args.objective))
        if setting["ac"]:
            model.gradient_checkpointing_enable()
        if setting["compile"]:
            model.compile_layers()
        micro_batch = setting["micro_batch"] or args.micro_batch
        # Not `Trainer.setup()`: this times synthetic models and random blocks (no corpus, no tokenizer
        # folder) under settings the trainer has no flag for (bf16 gradient accumulation); the DeepSpeed
        # config comes from the trainer's own resolution and the engine from the same deepspeed.initialize.
        cfg = TrainConfig(micro_batch_size=micro_batch, lr=1e-4, precision=setting["precision"])
        ds = load_deepspeed_json(f"zero{setting['stage']}")
        ds = resolve_deepspeed_config(ds, cfg, world_size=dist.world_size, precision=setting["precision"])
        if setting["low_precision_grads"]:
            ds["data_types"] = {"grad_accum_dtype": "bf16"}
            ds["communication_data_type"] = "bf16"
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01), config=ds)
        meter = Throughput(model_config=hf, objective=args.objective, device=device, dtype=setting["precision"],
                           world_size=dist.world_size)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        finite = torch.ones((), dtype=torch.bool, device=device)
        t0 = time.perf_counter()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:  # the trainer's steady state: the host runs ahead, one sync at the end
                sync()
                t0 = time.perf_counter()
            blocks = [rng.integers(1000, args.vocab_size, size=args.seq_len - 2) for _ in range(micro_batch)]
            tokens, lengths = collate_blocks(blocks, pad_id=0)
            plan = masker.plan(tokens.numpy(), lengths.numpy())
            batch = masker(tokens.to(device), lengths.to(device), mask_rng(0, step, dist.rank, device), plan=plan)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            finite &= torch.isfinite(loss.detach())
        sync()
        elapsed = time.perf_counter() - t0
        for _ in range(args.steps):
            meter.update(step_time=elapsed / args.steps, data_wait=0.0,
                         tokens=micro_batch * args.seq_len * dist.world_size,
                         samples=micro_batch * dist.world_size, seq_len=args.seq_len)
        finite = bool(finite)
        summary = meter.summary()
        summary["loss_finite"] = finite
        summary["micro_batch"] = micro_batch
        summary["final_loss"] = float(loss.detach())
        results["settings"][setting["name"]] = summary
        if dist.is_main and args.out:  # written after every setting: a time limit keeps what was measured
            with open(args.out, "w") as f:
                f.write(json.dumps(results, indent=1))
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    names = list(results["settings"])
    base = results["settings"][names[0]]
    for name in names:
        s = results["settings"][name]
        s["tokens_per_s_vs_" + names[0]] = round(s["tokens_per_s"] / base["tokens_per_s"], 3)
        mem_key = "peak_device_mem_gb" if device.type == "cuda" else "peak_host_mem_gb"
        if base.get(mem_key):
            s["peak_mem_vs_" + names[0]] = round(s[mem_key] / base[mem_key], 3)
    if dist.is_main:
        text = json.dumps(results, indent=1)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

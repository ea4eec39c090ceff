"""Benchmark the RetroMAE model code; prints one JSON object (ratios against baselines run in this process).

1. Mask generation: tokens/s of the vectorised MaskGenerator (on --device) vs the per-sample Python
   reference (scripts/masking_reference.py, on the CPU), at L = 128 and 512. Target: >= 100x at L = 512.
2. Heads: training-step time and peak memory of a MiniLM-sized RetroMAE (hidden 384, 6 layers, 12
   heads, vocabulary 30,522) at L = 512 with naive heads (full B x L x V logits, stock
   cross-entropy) vs fast heads (logits only where labels exist) and fast + chunked heads.
   Targets: fast >= 1.3x faster and >= 30% less peak memory.
   Peak memory: on CUDA torch.cuda.max_memory_allocated during the steps; on the CPU the steps' peak
   malloc'd bytes above those in use before them (model, optimizer state), sampled every 0.2 ms.

    python -m bench.bench_model                      # CUDA if available, else CPU (small batch)
    python -m bench.bench_model --device cpu --quick # smoke run
Runs from the root of a source checkout (it imports the Python reference from scripts/).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = ("naive", "fast", "fast_chunked")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tokenizer", default="", help="tokenizer folder for the continuation table "
                                                    "(default: the MiniLM one if installed, else a synthetic table)")
    p.add_argument("--mask-batch", type=int, default=32)
    p.add_argument("--batch", type=int, default=0, help="training micro-batch at L=512 (default: 32 CUDA, 4 CPU)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=0, help="timed training steps per variant (default: 10 CUDA, 2 CPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="training precision: auto = bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--skip-masks", action="store_true", help="only the heads benchmark")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# shared setup


def continuation_and_ids(tokenizer_path: str):
    """(continuation table, specials dict, ids to sample blocks from, description)."""
    from retromae_ds.data.demo_corpus import minilm_path
    from retromae_ds.data.masking import continuation_table
    from retromae_ds.errors import UserError

    path = tokenizer_path
    if not path:
        try:
            path = minilm_path()
        except UserError:  # no bundled MiniLM: a synthetic WordPiece-like table below
            path = ""
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        table = continuation_table(tok)
        specials = dict(cls=tok.cls_token_id, sep=tok.sep_token_id, pad=tok.pad_token_id, mask=tok.mask_token_id,
                        all=list(tok.all_special_ids))
        source = f"tokenizer {Path(path).name}"
    else:  # WordPiece-like: 30,522 ids, a fifth of them continue a word
        table = torch.zeros(30522, dtype=torch.bool)
        table[1000::5] = True
        specials = dict(cls=101, sep=102, pad=0, mask=103, all=[0, 100, 101, 102, 103])
        source = "synthetic WordPiece-like table"
    candidates = np.setdiff1d(np.arange(1000, len(table)), specials["all"])
    return table, specials, candidates, source


def random_blocks(candidates, n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(candidates, size=length) for _ in range(n)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# 1. mask generation


def bench_masks(device, args, table, specials, candidates) -> dict:
    from retromae_ds.data.masking import MaskGenerator, collate_blocks, mask_rng
    from scripts.masking_reference import reference_masks

    gen = MaskGenerator(table, specials["cls"], specials["sep"], specials["pad"], specials["mask"], len(table),
                        specials["all"]).to(device)
    out = {}
    for seq_len in (128, 512):
        batch = 4 if args.quick else args.mask_batch
        blocks = random_blocks(candidates, batch, seq_len - 2, seed=seq_len)
        tokens, lengths = collate_blocks(blocks, specials["pad"])
        tokens, lengths = tokens.to(device), lengths.to(device)
        for step in range(2):  # warm-up
            gen(tokens, lengths, mask_rng(0, step, 0, device))
        repeats = 2 if args.quick else (20 if device.type == "cuda" else 3)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        sync(device)
        start = time.perf_counter()
        for step in range(repeats):
            gen(tokens, lengths, mask_rng(0, step, 0, device))
        sync(device)
        vec_s = (time.perf_counter() - start) / repeats
        row = {"batch": batch, "vectorised_tokens_per_s": batch * seq_len / vec_s}
        if device.type == "cuda":
            row["vectorised_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20

        ref_samples = 2 if args.quick else (16 if seq_len == 128 else 4)
        ref_blocks = [b.tolist() for b in blocks[:ref_samples]]
        rng = random.Random(0)
        table_list, replacement = table.tolist(), gen.replacement_ids.cpu().tolist()
        start = time.perf_counter()
        reference_masks(ref_blocks, table_list, specials["cls"], specials["sep"], specials["pad"], specials["mask"],
                        replacement, rng)
        ref_s = (time.perf_counter() - start) / len(ref_blocks)
        row["python_tokens_per_s"] = seq_len / ref_s
        row["speedup"] = row["vectorised_tokens_per_s"] / row["python_tokens_per_s"]
        out[f"L{seq_len}"] = row
    return out


# --------------------------------------------------------------------------------------------------
# 2. fast vs naive heads


def minilm_sized(quick: bool):
    from transformers import BertConfig, BertForMaskedLM

    if quick:
        config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=512)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512)
    return BertForMaskedLM(config)


def build_variant(variant: str, rows: int, device, quick: bool):
    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining

    config = RetroMAEConfig(fast_heads=variant != "naive",
                            ce_chunk_size=max(256, rows // 4) if variant == "fast_chunked" else None)
    torch.manual_seed(0)
    model = RetroMAEForPretraining(minilm_sized(quick), config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, config


def make_batch(device, args, table, specials, candidates, batch: int):
    from retromae_ds.data.masking import MaskGenerator, collate_blocks, mask_rng

    gen = MaskGenerator(table, specials["cls"], specials["sep"], specials["pad"], specials["mask"], len(table),
                        specials["all"]).to(device)
    seq_len = 128 if args.quick else args.seq_len
    tokens, lengths = collate_blocks(random_blocks(candidates, batch, seq_len - 2, seed=1), specials["pad"])
    return gen(tokens.to(device), lengths.to(device), mask_rng(0, 0, 0, device))


def use_bf16(args, device) -> bool:
    return args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")


def train_step(model, optimizer, batch, device, bf16: bool = False) -> float:
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


class HeapPeak:
    """Peak bytes in use by malloc (glibc mallinfo2: arenas + mmapped blocks), sampled every 0.2 ms
    by a thread while the steps run. Unlike the resident set, this excludes freed memory the
    allocator keeps cached, so variants can be measured one after another in one process."""

    def __init__(self) -> None:
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo.restype = MallInfo2
        self.base = self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def _run(self) -> None:
        while not self._stop.wait(0.0002):
            self.peak = max(self.peak, self.read())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def bench_heads(device, args, table, specials, candidates) -> dict:
    batch_size = args.batch or (2 if args.quick else (32 if device.type == "cuda" else 4))
    steps = args.steps or (2 if args.quick else (10 if device.type == "cuda" else 2))
    batch = make_batch(device, args, table, specials, candidates, batch_size)
    rows = batch["encoder_input_ids"].numel()
    bf16 = use_bf16(args, device)
    results = {}
    losses = {}
    for variant in VARIANTS:
        model, optimizer, config = build_variant(variant, rows, device, args.quick)
        train_step(model, optimizer, batch, device, bf16)  # warm-up (also allocates the optimizer state)
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        gc.collect()
        heap = HeapPeak() if device.type == "cpu" else contextlib.nullcontext()
        sync(device)
        start = time.perf_counter()
        with heap:
            seen = [train_step(model, optimizer, batch, device, bf16) for _ in range(steps)]
        sync(device)
        row = {"step_s": (time.perf_counter() - start) / steps, "ce_chunk_size": config.ce_chunk_size}
        if device.type == "cuda":
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["step_peak_above_resident_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            row["peak_mb"] = (heap.peak - heap.base) / 2**20  # the steps' peak above what was in use before
        losses[variant] = seen
        results[variant] = row
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    naive = results["naive"]
    for variant in ("fast", "fast_chunked"):
        results[variant]["speedup_vs_naive"] = naive["step_s"] / results[variant]["step_s"]
        results[variant]["peak_memory_saving_vs_naive"] = 1 - results[variant]["peak_mb"] / naive["peak_mb"]
    same = all(np.allclose(losses["naive"], losses[v], rtol=2e-2 if bf16 else 1e-4) for v in VARIANTS)
    return {"batch": batch_size, "seq_len": batch["encoder_input_ids"].shape[1], "steps": steps,
            "dtype": "bf16 autocast" if bf16 else "fp32", "losses_agree": bool(same), **results}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          (args.device if args.device != "auto" else "cpu"))
    table, specials, candidates, source = continuation_and_ids(args.tokenizer)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "continuation_table": source,
              "quick": args.quick}
    if not args.skip_masks:
        report["mask_generation"] = bench_masks(device, args, table, specials, candidates)
    report["heads"] = bench_heads(device, args, table, specials, candidates)
    heads = report["heads"]
    report["targets"] = {
        "mask_speedup_L512_ge_100x": None if args.skip_masks else report["mask_generation"]["L512"]["speedup"] >= 100,
        "fast_heads_speedup_ge_1.3x": heads["fast"]["speedup_vs_naive"] >= 1.3,
        "fast_heads_memory_saving_ge_30pct": heads["fast"]["peak_memory_saving_vs_naive"] >= 0.30,
        "fast_chunked_speedup_ge_1.3x": heads["fast_chunked"]["speedup_vs_naive"] >= 1.3,
        "fast_chunked_memory_saving_ge_30pct": heads["fast_chunked"]["peak_memory_saving_vs_naive"] >= 0.30,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoder-mask generation: pool of K whole-word draws per sample vs one draw per attention row.

Prints one JSON object (and writes it to --out, default bench/results/bench_masks.json).

For L in --lengths and B in --batches, `MaskGenerator(decoder_mask_pool=K)` is timed for every K in
--pools (default 128 = the reference's pool, 0 = one draw per row). Blocks are real text: Wikipedia +
Lee news from the demo corpus, tokenized with the bundled MiniLM WordPiece tokenizer and cut into
blocks of L - 2 tokens, so word lengths (and the longest word, which bounds the pool's greedy rounds)
are realistic.

Optionally (--decoder, default on) the forward + backward pass of a tiny enhanced decoder layer
(retromae_ds/model/decoder.py; hidden 64, 2 heads, FFN 128, fp32) on those masks, to show where the
[B, L, L] attention itself starts to dominate once the masks are cheap.

Peak memory, honestly measured: every case runs in a fresh subprocess. On the CPU it is the process's
peak resident set (getrusage ru_maxrss) during the case's first call minus the resident set just
before it, so it counts every page the call touched (torch's CPU allocator returns large blocks to
the OS, so nothing from earlier calls hides in it). On CUDA it is torch.cuda.max_memory_allocated
above the memory allocated before the call. `output_mb` is the size of the [B, L, L] bool mask
itself, a floor for any method. Cases whose estimate (B x the measured B = 1 peak) exceeds
--limit-gb are skipped with a note instead of run.

    nice -n 5 python -m bench.bench_masks                 # the full table (CPU: a few minutes)
    python -m bench.bench_masks --lengths 512 --batches 1 --no-decoder --out ''   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


DECODER_NOTE = ("EnhancedDecoderLayer hidden 64, 2 heads, FFN 128, fp32, one forward + backward on a pool K={pool} "
                "mask; peak above the inputs (mask included) and the weights")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--pools", type=int, nargs="+", default=[128, 0])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case after the first (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = steadier on a shared box)")
    p.add_argument("--limit-gb", type=float, default=6.0, help="skip cases estimated above this peak")
    p.add_argument("--decoder", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure a tiny decoder layer's forward + backward")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_masks.json"))
    p.add_argument("--case", default="", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# one case, in its own process


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def real_text_blocks(batch: int, seq_len: int):
    """`batch` blocks of seq_len - 2 MiniLM token ids cut from the demo corpus (documents concatenated)."""
    import numpy as np
    from transformers import AutoTokenizer

    from retromae_ds.data.demo_corpus import iter_demo_documents, minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    need = batch * (seq_len - 2)
    ids: list[int] = []
    for text in iter_demo_documents():
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    ids_arr = np.array(ids[:need], dtype=np.int64)
    return tok, [ids_arr[i * (seq_len - 2):(i + 1) * (seq_len - 2)] for i in range(batch)]


def run_case(spec: dict) -> dict:
    import torch

    from retromae_ds.data.masking import MaskGenerator, collate_blocks, continuation_table, mask_rng

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    tok, blocks = real_text_blocks(spec["batch"], spec["seq_len"])
    gen = MaskGenerator(continuation_table(tok), tok.cls_token_id, tok.sep_token_id, tok.pad_token_id,
                        tok.mask_token_id, len(tok), tok.all_special_ids,
                        decoder_mask_pool=spec["pool"]).to(device)
    tokens, lengths = collate_blocks(blocks, tok.pad_token_id, pad_to_multiple_of=None)
    tokens, lengths = tokens.to(device), lengths.to(device)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def peak_start():
        if cuda:
            sync()
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return rss_bytes()

    def peak_end(base: int) -> float:
        sync()
        used = torch.cuda.max_memory_allocated(device) if cuda else peak_rss_bytes()
        return (used - base) / 2**20

    row = {}
    if spec["kind"] == "mask":
        base = peak_start()
        start = time.perf_counter()
        out = gen(tokens, lengths, mask_rng(0, 0, 0, device))
        sync()
        row["first_call_s"] = time.perf_counter() - start
        row["peak_mb"] = peak_end(base)
        mask = out["decoder_attention_mask"]
        row["output_mb"] = mask.numel() * mask.element_size() / 2**20
        row["visible_share"] = float(mask.float().mean())
        del out, mask
        times = []
        for step in range(1, spec["repeats"] + 1):
            sync()
            start = time.perf_counter()
            gen(tokens, lengths, mask_rng(0, step, 0, device))
            sync()
            times.append(time.perf_counter() - start)
        row["time_s"] = statistics.median(times) if times else row["first_call_s"]
    else:  # decoder forward + backward on a pool mask
        from retromae_ds.model.decoder import EnhancedDecoderLayer

        torch.manual_seed(0)
        layer = EnhancedDecoderLayer(hidden_size=64, num_attention_heads=2, intermediate_size=128).to(device)
        visible = gen(tokens, lengths, mask_rng(0, 0, 0, device))["decoder_attention_mask"]
        query = torch.randn(spec["batch"], visible.shape[1], 64, device=device, requires_grad=True)
        key_value = torch.randn(spec["batch"], visible.shape[1], 64, device=device, requires_grad=True)

        def step():
            layer(query, key_value, visible).square().mean().backward()

        base = peak_start()
        start = time.perf_counter()
        step()
        sync()
        row["first_call_s"] = time.perf_counter() - start
        row["peak_mb"] = peak_end(base)  # above the inputs (mask included) and the weights
        times = []
        for _ in range(spec["repeats"]):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        row["time_s"] = statistics.median(times) if times else row["first_call_s"]
    return row


# --------------------------------------------------------------------------------------------------
# driver


def spawn(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_masks", "--case", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        args.device if args.device != "auto" else "cpu")
    limit_mb = args.limit_gb * 1024
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "threads": args.threads, "text": "demo corpus (Wikipedia + Lee), MiniLM WordPiece",
              "peak_memory": ("torch.cuda.max_memory_allocated above the allocation before the call" if device == "cuda"
                              else "peak RSS (ru_maxrss) of a fresh subprocess during the first call minus RSS "
                                   "before it"),
              "time": f"median of {args.repeats} calls after a first (untimed-for-median) call",
              "limit_gb": args.limit_gb,
              "decoder_layer": DECODER_NOTE.format(pool=args.pools[0]),
              "masks": [], "decoder_fwd_bwd": []}
    kinds = [("mask", pool) for pool in args.pools] + ([("decoder", args.pools[0])] if args.decoder else [])
    for kind, pool in kinds:
        for seq_len in args.lengths:
            one_sample_mb = None
            for batch in sorted(args.batches):
                spec = {"kind": kind, "seq_len": seq_len, "batch": batch, "pool": pool, "device": device,
                        "threads": args.threads, "repeats": args.repeats}
                entry = {"seq_len": seq_len, "batch": batch}
                if kind == "mask":
                    entry["pool"] = pool
                estimate = one_sample_mb * batch if one_sample_mb is not None else None
                if estimate is not None and estimate > limit_mb:
                    entry["skipped"] = (f"estimated peak {estimate / 1024:.1f} GB (B x the B=1 peak) "
                                        f"> {args.limit_gb} GB")
                else:
                    entry.update(spawn(spec))
                    if batch == 1 and "peak_mb" in entry:
                        one_sample_mb = entry["peak_mb"]
                print(json.dumps(entry), file=sys.stderr, flush=True)
                report["masks" if kind == "mask" else "decoder_fwd_bwd"].append(entry)
    by_key = {(e["seq_len"], e["batch"], e["pool"]): e for e in report["masks"]}
    for entry in report["masks"]:
        other = by_key.get((entry["seq_len"], entry["batch"], 0))
        if entry["pool"] and other and "time_s" in entry and "time_s" in other:
            entry["speedup_vs_per_row"] = other["time_s"] / entry["time_s"]
            entry["memory_vs_per_row"] = entry["peak_mb"] / other["peak_mb"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

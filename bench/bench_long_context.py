"""Long-context RetroMAE (L up to 8,192) on the CPU: what the decoder costs, and a real training run.

1. `kernels`: one decoder layer forward + backward at L = 512 / 2,048 / 8,192 (batch 1, BERT-base
   width by default: hidden 768, 12 heads) with each candidate attention kernel for its [B, L, L]
   row mask, next to the encoder's activation memory at the same L (forward + backward of 1 and 2
   encoder layers, with and without activation checkpointing; per layer = the difference).
   Each at attention dropout 0 and 0.1 (BERT configs give the decoder 0.1; on the CPU, SDPA with
   dropout falls back to its math path, which materialises B x heads x L^2 probabilities). Kernels:
     sdpa-bool      scaled_dot_product_attention with the boolean mask, all rows at once (what the
                    decoder runs up to ROW_BLOCKS_FROM)
     sdpa-additive  the same with an additive float mask in the queries' dtype, built by the caller
     eager          matmul + masked softmax (the published reference's way; L <= 2,048 only)
     sdpa-rows      query rows in blocks of ROW_BLOCK = 1,024 (exact: rows are independent), each
                    block under activation checkpointing, so no full-size float mask is kept for
                    backward (what the decoder runs beyond ROW_BLOCKS_FROM)
   Peak memory = the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
   its resident set just before the measured call (after a warm-up step at L = 64, so parameter
   gradients already exist and what is measured is activations and attention buffers), each case in a fresh process with
   MALLOC_MMAP_THRESHOLD_ fixed so freed blocks really leave; inputs (and the bool mask) are
   allocated before the baseline, an additive mask inside the measured call.
2. `train`: prepares gensim's Wikipedia sample with --max-seq-len 8192 (articles concatenated into
   long documents so blocks are full) and trains a tiny model a few steps at L = 8,192 through the real
   trainer (launch/pretrain.py, one process, fp32, --activation-checkpointing): a rotary ModernBERT
   and a BERT whose 512-row position table is grown with --extend-positions 8192, each with and
   without --ce-chunk-size 1024 (at L = 8,192 the decoder labels every position, so its vocabulary
   logits alone are 8,190 x 30,522 x 4 bytes = 1 GB without chunking). Reports s/step, the tokens of
   each step and the trainer's peak host memory (its own metric, peak RSS of the process).

    python -m bench.bench_long_context kernels [--lengths 512 2048 8192] [--hidden 768 --heads 12]
    python -m bench.bench_long_context train [--models modernbert bert] [--steps 3]
    python -m bench.bench_long_context all --out bench/results/long_context_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KERNELS = ("sdpa-bool", "sdpa-additive", "eager", "sdpa-rows")
EAGER_MAX_LEN = 2048  # 12 heads x 8192^2 fp32 scores alone would be 3.2 GB per sample, several copies in backward


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("kernels", "train", "all"))
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--encoder", choices=("bert", "modernbert"), default="bert")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1],
                   help="decoder attention dropout values (BERT configs give the decoder 0.1)")
    p.add_argument("--parts", nargs="+", default=["decoder", "encoder"], choices=("decoder", "encoder"))
    p.add_argument("--repeats", type=int, default=1, help="runs per case (fresh processes); the fastest is kept")
    p.add_argument("--max-dense-gb", type=float, default=2.5,
                   help="skip all-rows kernels whose attention probabilities (B x heads x L^2 x 4 bytes, "
                        "materialised when dropout > 0 or eager) would exceed this")
    p.add_argument("--models", nargs="+", default=["modernbert", "bert"], choices=("modernbert", "bert"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ce-chunk-sizes", type=int, nargs="+", default=[0, 1024],
                   help="train runs with each --ce-chunk-size (0 = vocabulary logits of all labelled rows at once)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="write all results as JSON here")
    p.add_argument("--case", default="", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# one measurement per process


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _measure(forward) -> dict:
    """For forward() -> loss, then loss.backward(): the resident memory still held after the forward
    (what is saved for backward: the activations) and the peak during forward + backward, both above
    the resident set just before, and the wall time."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    loss = forward()
    held = _status_mb("VmRSS") - base
    loss.backward()
    return {"held_after_forward_mb": round(held, 1), "peak_mb": round(_status_mb("VmHWM") - base, 1),
            "seconds": round(time.perf_counter() - start, 2)}


def attention_kernel(name: str):
    """Bench-only kernels: (q, k, v, visible [B,L,L], dropout) -> out, replacing the decoder's attention call."""
    import torch
    import torch.nn.functional as F

    from retromae_ds.model.decoder import with_fallback_key

    def sdpa_additive(q, k, v, visible, dropout):
        visible = with_fallback_key(visible)[:, None]
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~visible, torch.finfo(q.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)

    def eager(q, k, v, visible, dropout):
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        probs = scores.masked_fill(~with_fallback_key(visible)[:, None], torch.finfo(q.dtype).min).softmax(-1)
        return F.dropout(probs, dropout) @ v

    return {"sdpa-additive": sdpa_additive, "eager": eager}[name]


def patch_decoder_kernel(layer, kernel: str) -> None:
    """sdpa-bool / sdpa-rows: the decoder's own code with row blocks off / always on; the others
    replace its attention call (same projections, rotary and layout)."""
    attention = layer.attention.self
    if kernel in ("sdpa-bool", "sdpa-rows"):
        attention.row_blocks_from = 10 ** 9 if kernel == "sdpa-bool" else 0
        return
    fn = attention_kernel(kernel)

    def forward(query, key_value, visible):
        q, k, v = attention._split(attention.query(query)), attention._split(attention.key(key_value)), \
            attention._split(attention.value(key_value))
        if attention.rotary is not None:
            q, k = attention.rotary(q), attention.rotary(k)
        out = fn(q, k, v, visible, attention.dropout if attention.training else 0.0)
        batch, _, length, _ = out.shape
        return out.transpose(1, 2).reshape(batch, length, -1)

    attention.forward = forward


def decoder_mask(batch: int, length: int, seed: int = 0):
    """A [B, L, L] row mask shaped like the real one: about half the columns visible per row, column
    0 (the sentence embedding) always, the row's own position never."""
    import torch

    g = torch.Generator().manual_seed(seed)
    visible = torch.rand(batch, length, length, generator=g) < 0.5
    visible[:, :, 0] = True
    visible[:, torch.arange(length), torch.arange(length)] = False
    return visible


def case_decoder(case: dict) -> dict:
    import torch

    from retromae_ds.model.decoder import EnhancedDecoderLayer

    torch.manual_seed(0)
    b, length, hidden = case["batch"], case["length"], case["hidden"]
    layer = EnhancedDecoderLayer(hidden, case["heads"], 4 * hidden, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=case.get("dropout", 0.0))
    patch_decoder_kernel(layer, case["kernel"])

    def step(length):
        query = torch.randn(b, length, hidden, requires_grad=True)
        key_value = torch.randn(b, length, hidden, requires_grad=True)
        visible = decoder_mask(b, length)
        return lambda: layer(query, key_value, visible).square().mean(), visible

    warm, _ = step(64)  # parameter gradients and lazily built kernels exist before the measurement
    warm().backward()
    run, visible = step(length)

    result = _measure(run)
    result["mask_mb"] = round(visible.numel() / 2 ** 20, 1)
    return result


def case_encoder(case: dict) -> dict:
    import torch
    from transformers import BertConfig, BertModel, ModernBertConfig, ModernBertModel

    torch.manual_seed(0)
    b, length, hidden, layers = case["batch"], case["length"], case["hidden"], case["layers"]
    if case["encoder"] == "bert":
        model = BertModel(BertConfig(hidden_size=hidden, num_attention_heads=case["heads"], num_hidden_layers=layers,
                                     intermediate_size=4 * hidden, max_position_embeddings=max(length, 512),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                          add_pooling_layer=False)
    else:
        model = ModernBertModel(ModernBertConfig(hidden_size=hidden, num_attention_heads=case["heads"],
                                                 num_hidden_layers=layers, intermediate_size=int(1.5 * hidden),
                                                 max_position_embeddings=max(length, 8192)))
    model.train()
    if case["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    def step(length):
        # inputs_embeds: the word-embedding gradient (a dense vocabulary x hidden temporary in backward)
        # is the same at every L and would hide the layers' activations at short L
        embeds = torch.randn(b, length, hidden)
        mask = torch.ones(b, length, dtype=torch.long)
        return lambda: model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state.square().mean()

    step(64)().backward()  # parameter gradients exist before the measurement: what is left is activations
    return _measure(step(length))


def run_case(case: dict, threads: int, repeats: int = 1) -> dict:
    """Run one measurement in fresh interpreters (`repeats` times; the fastest run is kept)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    best = None
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-m", "bench.bench_long_context", "kernels", "--case", json.dumps(case)],
                              env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            return {**case, "error": lines[-1] if lines else f"rc {proc.returncode}"}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        best = result if best is None or result["seconds"] < best["seconds"] else best
    return {**case, **best}


def kernels(args) -> dict:
    rows = []
    for length in args.lengths:
        common = dict(batch=args.batch, length=length, hidden=args.hidden, heads=args.heads)
        dense_gb = args.batch * args.heads * length ** 2 * 4 / 2 ** 30
        for dropout in (args.dropouts if "decoder" in args.parts else []):
            for kernel in KERNELS:
                case = dict(kind="decoder", kernel=kernel, dropout=dropout, **common)
                dense = kernel == "eager" or (dropout > 0 and kernel != "sdpa-rows")
                if kernel == "eager" and length > EAGER_MAX_LEN:
                    rows.append({**case, "skipped": f"eager only up to L = {EAGER_MAX_LEN}"})
                elif dense and dense_gb > args.max_dense_gb:
                    rows.append({**case, "skipped": f"would materialise {dense_gb:.1f} GB of attention probabilities"})
                else:
                    rows.append(run_case(case, args.threads, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
        for checkpointing in ((False, True) if "encoder" in args.parts else ()):
            for layers in (1, 2):
                rows.append(run_case(dict(kind="encoder", encoder=args.encoder, layers=layers,
                                          checkpointing=checkpointing, **common), args.threads, args.repeats))
                print(json.dumps(rows[-1]), flush=True)
    settings = ("lengths", "hidden", "heads", "batch", "encoder", "threads", "dropouts", "repeats")
    return {"settings": {k: getattr(args, k) for k in settings}, "rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per L: each kernel's decoder peak and time; the encoder's per-layer activation memory."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        at = [r for r in rows if r["length"] == length and "error" not in r and "skipped" not in r]
        entry = {"length": length}
        for dropout in sorted({r["dropout"] for r in at if r["kind"] == "decoder"}):
            entry[f"decoder_dropout_{dropout:g}"] = {
                r["kernel"]: {k: r[k] for k in ("held_after_forward_mb", "peak_mb", "seconds")}
                for r in at if r["kind"] == "decoder" and r["dropout"] == dropout}
        for ckpt in (False, True):
            enc = {r["layers"]: r for r in at if r["kind"] == "encoder" and r["checkpointing"] == ckpt}
            if 1 in enc and 2 in enc:
                entry["encoder_ckpt" if ckpt else "encoder"] = {
                    "held_per_layer_mb": round(enc[2]["held_after_forward_mb"] - enc[1]["held_after_forward_mb"], 1),
                    "peak_per_layer_mb": round(enc[2]["peak_mb"] - enc[1]["peak_mb"], 1),
                    "one_layer": {k: enc[1][k] for k in ("held_after_forward_mb", "peak_mb", "seconds")},
                    "two_layers": {k: enc[2][k] for k in ("held_after_forward_mb", "peak_mb", "seconds")}}
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------------
# training at L = 8,192 through the real trainer


def long_tokenizer(folder: Path) -> str:
    """The MiniLM WordPiece tokenizer, saved without its model's config and with model_max_length
    8,192 (prepare checks --max-seq-len against both)."""
    from transformers import AutoTokenizer

    from retromae_ds.data.demo_corpus import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def long_corpus(path: Path, min_chars: int = 200_000) -> str:
    """gensim's Wikipedia sample as documents of >= min_chars characters (articles concatenated), so
    packed blocks fill all 8,190 tokens except each document's last one."""
    from retromae_ds.data.demo_corpus import iter_wikipedia_articles

    docs, current = [], []
    for article in iter_wikipedia_articles():
        current.append(article)
        if sum(len(a) for a in current) >= min_chars:
            docs.append("\n\n".join(current))
            current = []
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


TINY = {
    "modernbert": dict(architectures=["ModernBertForMaskedLM"], model_type="modernbert", vocab_size=30522,
                       hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                       max_position_embeddings=8192, pad_token_id=0, cls_token_id=101, sep_token_id=102,
                       bos_token_id=101, eos_token_id=102),
    "bert": dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=30522, hidden_size=64,
                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=512,
                 pad_token_id=0),
}


def train(args) -> dict:
    from retromae_ds.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="long_context_"))
    tok = long_tokenizer(work / "tokenizer")
    prefix = str(work / "wiki8k")
    t0 = time.perf_counter()
    if cli(["prepare", "--input", long_corpus(work / "wiki.jsonl"), "--tokenizer", tok, "--output", prefix,
            "--max-seq-len", "8192", "--num-proc", "1"]) != 0:
        raise SystemExit("prepare failed")
    prepare_s = time.perf_counter() - t0
    results = {"prepare_seconds": round(prepare_s, 1), "runs": []}
    for name, chunk in [(m, c) for m in args.models for c in args.ce_chunk_sizes]:
        (work / name).mkdir(exist_ok=True)
        (work / name / "config.json").write_text(json.dumps(TINY[name]))
        out = work / f"run_{name}_ce{chunk}"
        cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--data", prefix, "--model-config",
               str(work / name), "--tokenizer", tok, "--max-seq-len", "8192", "--micro-batch-size", "1",
               "--max-steps", str(args.steps), "--activation-checkpointing", "--log-interval", "1",
               "--eval-heldout-docs", "0", "--eval-max-length", "128", "--no-export", "--save-interval", "0",
               "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--output-dir", str(out), "--lr", "1e-3",
               "--ce-chunk-size", str(chunk)]
        if name == "bert":
            cmd += ["--extend-positions", "8192"]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            error = (proc.stdout + proc.stderr)[-3000:]
            results["runs"].append({"model": name, "ce_chunk_size": chunk, "error": error})
            print(results["runs"][-1]["error"], flush=True)
            continue
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        steps = [r for r in rows if r.get("kind", "train") == "train"]
        tokens = [s["tokens_seen"] for s in steps]
        run = {"model": name, "ce_chunk_size": chunk, "steps": len(steps), "wall_seconds": round(wall, 1),
               "tokens_per_step": [b - a for a, b in zip([0] + tokens, tokens)],
               "losses": [round(s["loss"], 4) for s in steps],
               "decoder_losses": [round(s["decoder_loss"], 4) for s in steps],
               "step_seconds": [round(s.get("step_time_s", float("nan")), 2) for s in steps],
               "data_wait_seconds": [round(s.get("data_wait_s", float("nan")), 2) for s in steps],
               "trainer_peak_host_mem_gb": round(max((s.get("peak_host_mem_gb") or 0) for s in steps), 2),
               "console_lines": [line for line in proc.stdout.splitlines() if line.startswith("[retromae-ds]")][:4]}
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(case_decoder(case) if case["kind"] == "decoder" else case_encoder(case)))
        return 0
    results = {}
    if args.what in ("kernels", "all"):
        results["kernels"] = kernels(args)
    if args.what in ("train", "all"):
        results["train"] = train(args)
    print(json.dumps({k: v.get("summary", v) for k, v in results.items()}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

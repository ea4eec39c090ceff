"""Host overhead of the trainer's step: the trainer vs a bare DeepSpeed loop over the same model and batch.

A CPU proxy for issue 9 (no GPU needed): with a tiny model (2 layers x 64) compute is small, so the
difference between the trainer's step time and a bare `engine(**batch); engine.backward(loss);
engine.step()` loop over pre-built batches is the per-step host work the trainer adds: collating blocks,
drawing masks, setting the LR, the flags it agrees on, logging. On a GPU this host work must stay far
below the model's step time (BERT-base at L=512 and 40% MFU is ~30 ms per step) for the device to stay busy.

    python -m bench.bench_overhead [--steps 60] [--log-interval 10]      # prints JSON

On a GPU (bench/gpu_check.sh) the same comparison runs on a real model and prepared data:
    python -m bench.bench_overhead --data PREFIX --tokenizer DIR --model-config DIR --seq-len 512 \
        --micro-batch 32 --precision bf16 --deepspeed zero1 --profile-steps 30-32

Both run in ONE process, one after the other, on the same prepared data (the demo corpus format, built
here from gensim's Lee background news with the bundled MiniLM tokenizer), same model, same DeepSpeed
config (ZeRO-2, fp32, CPU). The trainer's step time is its own `step_time_s` from metrics.jsonl over
the logged windows after the first (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=30522, hidden_size=64,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=128,
            type_vocab_size=2, pad_token_id=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--profile-steps", default="", help="also trace these trainer steps (e.g. 40-45) and add the "
                    "profile summary (host ms, aten ops per step, top operators) to the output")
    ap.add_argument("--out", default="", help="also write the JSON here")
    ap.add_argument("--data", default="", help="a prepared dataset prefix (default: Lee news prepared here)")
    ap.add_argument("--tokenizer", default="", help="its tokenizer folder (default: the bundled MiniLM's)")
    ap.add_argument("--model-config", default="", help="HF config folder (default: BERT 2 x 64)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--deepspeed", default="zero2", help="bundled config name or JSON path")
    args = ap.parse_args()

    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.trainer import Trainer

    work = Path(tempfile.mkdtemp(prefix="bench_overhead_"))
    if args.data:
        prefix, tok = args.data, args.tokenizer
    else:
        prefix, tok = lee_corpus(work, args.seq_len)
    if args.model_config:
        model_dir = args.model_config
    else:
        model_dir = str(work / "tiny")
        (work / "tiny").mkdir()
        (work / "tiny" / "config.json").write_text(json.dumps(TINY))

    cfg = TrainConfig(data=[prefix], model_config=model_dir, tokenizer=tok, output_dir=str(work / "run"),
                      micro_batch_size=args.micro_batch, max_steps=args.steps, log_interval=args.log_interval,
                      save_interval=0, eval_interval=0, eval_heldout_docs=0, eval_max_length=128, export=False, resume="none",
                      deepspeed=args.deepspeed, lr=1e-4, profile_steps=args.profile_steps, precision=args.precision,
                      max_seq_len=args.seq_len)
    cfg.explicit = set()
    t = time.perf_counter()
    assert Trainer(cfg).train() == 0
    trainer_wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind", "train") == "train"][1:]
    trainer_step = statistics.median(r["step_time_s"] for r in train_rows)

    bare_step = bare_loop(cfg, args)
    result = {
        "model": f"{model_dir if args.model_config else 'BERT 2 x 64 (random init)'}, {args.deepspeed} {args.precision}, "
                 f"1 rank, {'CUDA' if _cuda() else 'CPU, OMP_NUM_THREADS=1'}",
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "steps": args.steps,
        "trainer_step_ms": round(trainer_step * 1e3, 2), "bare_loop_step_ms": round(bare_step * 1e3, 2),
        "host_overhead_ms_per_step": round((trainer_step - bare_step) * 1e3, 2),
        "trainer_vs_bare_tokens_per_s": round(bare_step / trainer_step, 3),
        "trainer_tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_rows),
        "trainer_mfu": statistics.median(r["mfu"] for r in train_rows) if all("mfu" in r for r in train_rows) else None,
        "peak_device_mem_gb": train_rows[-1].get("peak_device_mem_gb"),
        "trainer_wall_s_incl_startup_and_final_eval": round(trainer_wall, 1),
    }
    summary = work / "run" / "profile" / "summary.json"
    if summary.exists():
        profile = json.loads(summary.read_text())
        result["profile"] = {k: profile[k] for k in ("steps", "wall_ms_per_step", "device_busy_ms_per_step",
                                                     "device_busy_share", "aten_ops_per_step",
                                                     "kernel_launches_per_step", "host_syncs_per_step")}
        result["profile"]["top_host"] = profile["top_host"][:12]
        result["profile"]["top_device"] = profile["top_device"][:12]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def lee_corpus(work: Path, seq_len: int) -> tuple[str, str]:
    """gensim's Lee background news prepared with the bundled MiniLM tokenizer: (prefix, tokenizer)."""
    import gensim

    from retromae_ds.cli import main as cli
    from retromae_ds.data.demo_corpus import minilm_path

    tok = minilm_path()
    src = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
    docs = [line.strip() for line in src.read_text(encoding="latin-1").splitlines() if line.strip()]
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = str(work / "lee")
    assert cli(["prepare", "--input", str(work / "docs.jsonl"), "--tokenizer", tok, "--output", prefix,
                "--max-seq-len", str(seq_len)]) == 0
    return prefix, tok


def bare_loop(cfg, args) -> float:
    """The same engine and batches, nothing else: pre-built masked batches, forward, backward, step.
    The engine, data, masker and sampler are the trainer's own (`Trainer.setup()`), built afresh."""
    import dataclasses

    import torch

    from retromae_ds.data.masking import collate_blocks, mask_rng
    from retromae_ds.engine.trainer import Trainer

    bare_cfg = dataclasses.replace(cfg, output_dir=cfg.output_dir + "_bare")
    bare_cfg.explicit = set(cfg.explicit)
    trainer = Trainer(bare_cfg)
    trainer.setup()
    engine, masker, sampler, data = trainer.engine, trainer.masker, trainer.sampler, trainer.data.train
    pad_id = trainer.tokenizer.pad_token_id
    batches = []
    for step in range(args.steps):
        blocks = [data[int(i)][: args.seq_len - 2] for i in sampler.next_global_batch(args.micro_batch)]
        tokens, lengths = collate_blocks(blocks, pad_id, pad_to_multiple_of=trainer.loader.pad_multiple,
                                         max_tokens=args.seq_len - 2)
        plan = masker.plan(tokens.numpy(), lengths.numpy())  # the trainer's static batches (same shapes, no syncs)
        batches.append(masker(tokens.to(engine.device), lengths.to(engine.device),
                              mask_rng(cfg.seed, step, 0, engine.device), plan=plan))
    engine.train()

    def run(part) -> float:
        sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for batch in part:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        sync()  # device time counts (the loop itself never waits)
        return (time.perf_counter() - t) / len(part)

    run(batches[:args.log_interval])  # warm-up, like the trainer's first (dropped) window
    rest = batches[args.log_interval:]
    windows = [run(rest[i:i + args.log_interval]) for i in range(0, len(rest), args.log_interval)]
    return statistics.median(windows)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# GPU check (one H100/H200, < 8 minutes; every section has its own time limit). Writes $OUT/gpu_check.json,
# $OUT/gpu_check.md (the README tables) and $OUT/logs.txt (the end of every log); the parts:
#  0. syncs_cuda.json: would-be host-device syncs per training step on CUDA (scripts/count_syncs.py: the
#     dispatcher watch plus torch.cuda.set_sync_debug_mode("warn")); steps without logging must show
#     none from retromae_ds or transformers, only DeepSpeed's optimizer-step checks;
#  1. overhead_*.json: the trainer (launch/pretrain.py's loop: prepared data, loader thread, masks on the
#     device, logging every 10 steps, no eval/saves) vs a bare engine loop over the same batches, BERT-base
#     random init, bf16: tokens/s, MFU, peak memory, trainer / bare ratio, and a torch.profiler summary
#     (device busy share, kernel launches and syncs per step) -- at L = 512 (ZeRO-1 and ZeRO-2) and L = 128;
#  1b. padding_L512.json: a ragged corpus (passage-length blocks, bench/bench_padding.py), BERT-base bf16 at
#     L = 512, random vs --group-by-length batches: padding efficiency and real tokens/s;
#  2. gpu_check.json: the step-throughput matrix (bench/bench_train.py: same step, no trainer): ZeRO-1/2/3,
#     bf16/fp16, activation checkpointing, bf16 gradient accumulation, --compile, and micro-batch 16..128
#     (the batch-size table), tokens/s, TFLOP/s, MFU, peak memory;
#  2b. long_context.json: the BERT-base shape at L = 8,192 (bf16, ZeRO-2, activation checkpointing);
#  3. the real trainer end to end (fp16 loss scaling, ZeRO-2, NCCL): SIGUSR1 after the first checkpoint ->
#     save + exit 0 -> the same command resumes, finishes, evaluates and exports.
#   bash bench/gpu_check.sh           # from the repository root; needs deepspeed + transformers
# Env: MICRO_BATCH (32), SEQ_LEN (512), STEPS (20), TOKENIZER (a BERT WordPiece tokenizer folder)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
WORK="$(mktemp -d)"  # data, runs and logs; only the results (gpu_check.json/.md, logs.txt) go to $OUT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MICRO_BATCH="${MICRO_BATCH:-32}"; SEQ_LEN="${SEQ_LEN:-512}"; STEPS="${STEPS:-10}"
TOK="${TOKENIZER:-.gpu/tokenizer}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$WORK/gpu.txt"
python3 -m scripts.make_synthetic_data --tokenizer "$TOK" --output "$WORK/synth/data" --blocks 4096 --seq-len 512
python3 -m scripts.make_synthetic_data --tokenizer "$TOK" --output "$WORK/synth128/data" --blocks 8192 --seq-len 128
python3 -m scripts.make_synthetic_data --tokenizer "$TOK" --output "$WORK/ragged/data" --blocks 8192 --seq-len 512 --ragged
mkdir -p "$WORK/bert_base" "$WORK/tiny"
cat > "$WORK/bert_base/config.json" <<JSON
{"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
 "type_vocab_size": 2, "pad_token_id": 0}
JSON
cat > "$WORK/tiny/config.json" <<JSON
{"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 64,
 "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128, "max_position_embeddings": 512,
 "type_vocab_size": 2, "pad_token_id": 0}
JSON

echo "== 0. host-device syncs per step on CUDA" >&2
timeout 60 python3 -m scripts.count_syncs -- --data "$WORK/synth128/data" --model-config "$WORK/tiny" --tokenizer "$TOK" \
  --micro-batch-size 8 --grad-accum 2 --precision bf16 --deepspeed zero2 --save-interval 0 --eval-heldout-docs 0 \
  --no-export --output-dir "$WORK/syncs_run" > "$WORK/syncs.log" 2>&1
sed -n '/^{/,$p' "$WORK/syncs.log" > "$WORK/syncs_cuda.json"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('syncs/step without logging', d['by_package_without_logging'])" "$WORK/syncs_cuda.json" >&2

echo "== 1. trainer vs bare loop (BERT-base, bf16)" >&2
for spec in "zero1 512 32 synth 80" "zero2 512 32 synth 80" "zero1 128 128 synth128 60"; do
  set -- $spec
  timeout "$5" python3 -m bench.bench_overhead --data "$WORK/$4/data" --tokenizer "$TOK" --model-config "$WORK/bert_base" \
    --seq-len "$2" --micro-batch "$3" --precision bf16 --deepspeed "$1" --steps 50 --log-interval 10 \
    --profile-steps 32-34 --out "$WORK/overhead_$1_L$2.json" > "$WORK/overhead_$1_L$2.log" 2>&1
  echo "overhead $spec exit $?" >&2
done

echo "== 1b. ragged corpus: random vs length-grouped batches (BERT-base, bf16, L = 512)" >&2
timeout 120 python3 -m bench.bench_padding --data "$WORK/ragged/data" --model-config "$WORK/bert_base" --tokenizer "$TOK" \
  --seq-len 512 --micro-batch 32 --steps 30 --log-interval 10 --precision bf16 --repeats 1 --settings random,grouped \
  --out "$WORK/padding_L512.json" > "$WORK/padding_L512.log" 2>&1
echo "padding exit $?" >&2

echo "== 2. step throughput matrix + batch sizes" >&2
timeout 100 python3 -m bench.bench_train --preset bert-base --seq-len "$SEQ_LEN" --micro-batch "$MICRO_BATCH" \
  --steps "$STEPS" --warmup 3 \
  --settings z2-bf16,z1-bf16,z1-bf16-mb64,z1-bf16-mb128,z1-bf16-ac-mb128,z2-bf16-bf16grads,z3-bf16,z1-bf16-compile \
  --out "$WORK/gpu_check.json" > "$WORK/bench_train.log" 2>&1
echo "bench_train exit $?" >&2; grep -v "^\[20" "$WORK/bench_train.log" | tail -n 5 >&2

echo "== 2b. long context: BERT-base shape at L = 8,192 (8,192 positions), bf16, activation checkpointing" >&2
timeout 30 python3 -m bench.bench_train --preset bert-base --seq-len 8192 --micro-batch 1 --steps 5 --warmup 2 \
  --settings z2-bf16-ac --out "$WORK/long_context.json" > "$WORK/long_context.log" 2>&1
echo "long context exit $?" >&2

echo "== 3. trainer end to end (fp16, ZeRO-2): signal, resume, eval, export" >&2
RUN=(launch/pretrain.py --deepspeed ds_configs/zero2.json --data "$WORK/synth/data" --model-config "$WORK/bert_base"
     --tokenizer "$TOK" --micro-batch-size 16 --precision fp16 --max-steps 30 --save-interval 10
     --log-interval 10 --eval-heldout-docs 20 --output-dir "$WORK/run")
timeout 50 python3 "${RUN[@]}" > "$WORK/trainer1.log" 2>&1 &
PID=$!
for _ in $(seq 600); do [ -f "$WORK/run/checkpoints/step_00000010/COMPLETE" ] && break; kill -0 $PID 2>/dev/null || break; sleep 0.5; done
kill -USR1 $PID 2>/dev/null; wait $PID; RC1=$?
timeout 45 python3 "${RUN[@]}" > "$WORK/trainer2.log" 2>&1; RC2=$?
grep -v "^\[20" "$WORK/trainer1.log" | tail -n 8 >&2; grep -v "^\[20" "$WORK/trainer2.log" | tail -n 12 >&2
python3 - "$WORK" "$RC1" "$RC2" "$OUT" <<'PY'
import json, sys, pathlib
out, rc1, rc2, final = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
path = out / "gpu_check.json"
res = json.loads(path.read_text()) if path.exists() else {"bench_train": "failed, see bench_train.log"}
long_path = out / "long_context.json"
res["long_context_8192"] = json.loads(long_path.read_text()) if long_path.exists() else "failed, see long_context.log"
for name in ("syncs_cuda", "overhead_zero1_L512", "overhead_zero2_L512", "overhead_zero1_L128", "padding_L512"):
    part = out / f"{name}.json"
    try:
        res[name] = json.loads(part.read_text())
    except (OSError, ValueError):
        res[name] = f"failed, see {name}.log"
rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()] \
    if (out / "run" / "metrics.jsonl").exists() else []
train = [r for r in rows if r.get("kind") == "train"]
evals = [r for r in rows if r.get("kind") == "eval"]
log1 = (out / "trainer1.log").read_text() if (out / "trainer1.log").exists() else ""
log2 = (out / "trainer2.log").read_text() if (out / "trainer2.log").exists() else ""
res["trainer_fp16_zero2"] = {
    "exit_codes": [rc1, rc2], "stopped_on_signal": "stopped on signal" in log1,
    "resumed": "resumed from" in log2, "steps": train[-1]["step"] if train else None,
    "first_loss": train[0]["loss"] if train else None, "final_loss": train[-1]["loss"] if train else None,
    "tokens_per_s": train[-1].get("tokens_per_s") if train else None, "mfu": train[-1].get("mfu") if train else None,
    "loss_scale": train[-1].get("loss_scale") if train else None, "eval": evals[-1] if evals else None,
    "exported": (out / "run" / "export" / "config.json").exists(),
}
res["gpu"] = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None
(final / "gpu_check.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))


def num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


md = [f"GPU: {res['gpu']}", "", "Trainer vs bare loop (bench/bench_overhead.py, BERT-base random init, bf16):", "",
      "| config | L | micro | trainer tokens/s | MFU | trainer ms/step | bare ms/step | trainer / bare | peak GB "
      "| device busy | launches/step | syncs/step |", "|" + " --- |" * 12]
for name in ("overhead_zero1_L512", "overhead_zero2_L512", "overhead_zero1_L128"):
    r = res[name]
    if not isinstance(r, dict):
        md.append(f"| {name} | {r} |")
        continue
    prof = r.get("profile") or {}
    md.append(f"| {name.split('_')[1]} | {r['seq_len']} | {r['micro_batch']} | {num(r['trainer_tokens_per_s'], ',.0f')} "
              f"| {num(r['trainer_mfu'] and 100 * r['trainer_mfu'], '.1f')}% | {r['trainer_step_ms']} | {r['bare_loop_step_ms']} "
              f"| {r['trainer_vs_bare_tokens_per_s']} | {num(r['peak_device_mem_gb'], '.1f')} "
              f"| {num(prof.get('device_busy_share') and 100 * prof['device_busy_share'], '.0f')}% "
              f"| {num(prof.get('kernel_launches_per_step'), '.0f')} | {num(prof.get('host_syncs_per_step'), '.1f')} |")
md += ["", "Step matrix (bench/bench_train.py, same step without the trainer):", "",
       "| setting | micro | tokens/s | TFLOP/s | MFU | peak GB | tokens/s vs first | finite |", "|" + " --- |" * 8]
for name, r in (res.get("settings") or {}).items():
    md.append(f"| {name} | {r.get('micro_batch')} | {num(r.get('tokens_per_s'), ',.0f')} | {num(r.get('tflops_per_device'), '.1f')} "
              f"| {num(r.get('mfu') and 100 * r['mfu'], '.1f')}% | {num(r.get('peak_device_mem_gb'), '.1f')} "
              f"| {next((v for k, v in r.items() if k.startswith('tokens_per_s_vs_')), '-')} | {r.get('loss_finite')} |")
pad = res.get("padding_L512")
md += ["", "Ragged corpus, BERT-base bf16, L = 512, micro-batch 32 (bench/bench_padding.py):", "",
       "| batches | padding efficiency | real tokens/s | vs random |", "| --- | --- | --- | --- |"]
for name, r in ((pad or {}).get("settings") or {}).items() if isinstance(pad, dict) else []:
    md.append(f"| {name} | {r['padding_efficiency']} | {num(r['real_tokens_per_s_median'], ',.0f')} "
              f"| {r['real_tokens_per_s_vs_first']} |")
syncs = res.get("syncs_cuda")
md += ["", f"Syncs per step without logging (CUDA): {syncs.get('by_package_without_logging') if isinstance(syncs, dict) else syncs}",
       "", f"Trainer end to end (fp16, ZeRO-2, signal + resume): {json.dumps(res['trainer_fp16_zero2'])}"]
(final / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
logs = []
for log in sorted(out.glob("*.log")):
    logs.append(f"==== {log.name}\n" + "\n".join(l for l in log.read_text(errors="replace").splitlines()[-40:]
                                                    if not l.startswith("[20")))
(final / "logs.txt").write_text("\n\n".join(logs) + "\n")
PY

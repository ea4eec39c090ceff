#!/usr/bin/env bash
# GPU check (one H100/H200, < 8 minutes). Prints JSON (and writes $OUT/gpu_check.json when OUT is set):
#  1. step throughput of BERT-base-sized RetroMAE (random init) at L=512 under DeepSpeed:
#     ZeRO-2 bf16, ZeRO-2 fp16, ZeRO-3 bf16, each with and without activation checkpointing, and ZeRO-2 bf16
#     with bf16 gradient accumulation/reduction (the cost of the trainer's fp32 default):
#     tokens/s, TFLOPs, MFU, peak memory, loss finiteness (bench/bench_train.py, one process);
#  1b. BERT-base shape at L = 8,192 (bf16, ZeRO-2, activation checkpointing): tokens/s, peak memory;
#  2. the real trainer end to end on the GPU (launch/pretrain.py, fp16 loss scaling, ZeRO-2, NCCL):
#     SIGUSR1 after the first checkpoint -> save + exit 0 -> the same command resumes and finishes,
#     evaluates and exports.
#   bash bench/gpu_check.sh           # from the repository root; needs deepspeed + transformers
# Env: MICRO_BATCH (32), SEQ_LEN (512), STEPS (20), TOKENIZER (a BERT WordPiece tokenizer folder)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MICRO_BATCH="${MICRO_BATCH:-32}"; SEQ_LEN="${SEQ_LEN:-512}"; STEPS="${STEPS:-20}"
TOK="${TOKENIZER:-.gpu/tokenizer}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== 1. step throughput matrix" >&2
python3 bench/bench_train.py --preset bert-base --seq-len "$SEQ_LEN" --micro-batch "$MICRO_BATCH" \
  --steps "$STEPS" --warmup 3 --settings z2-bf16,z2-bf16-bf16grads,z2-bf16-ac,z2-fp16,z2-fp16-ac,z3-bf16,z3-bf16-ac \
  --out "$OUT/gpu_check.json" > "$OUT/bench_train.log" 2>&1
echo "bench_train exit $?" >&2; grep -v "^\[20" "$OUT/bench_train.log" | tail -n 5 >&2

echo "== 1b. long context: BERT-base shape at L = 8,192 (8,192 positions), bf16, activation checkpointing" >&2
python3 bench/bench_train.py --preset bert-base --seq-len 8192 --micro-batch 1 --steps 5 --warmup 2 \
  --settings z2-bf16-ac --out "$OUT/long_context.json" > "$OUT/long_context.log" 2>&1
echo "long context exit $?" >&2

echo "== 2. trainer end to end (fp16, ZeRO-2): signal, resume, eval, export" >&2
python3 bench/make_synthetic_data.py --tokenizer "$TOK" --output "$OUT/synth/data" --blocks 4096 --seq-len "$SEQ_LEN"
mkdir -p "$OUT/bert_base"
cat > "$OUT/bert_base/config.json" <<JSON
{"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
 "type_vocab_size": 2, "pad_token_id": 0}
JSON
RUN=(launch/pretrain.py --deepspeed ds_configs/zero2.json --data "$OUT/synth/data" --model-config "$OUT/bert_base"
     --tokenizer "$TOK" --micro-batch-size 16 --precision fp16 --max-steps 60 --save-interval 20
     --log-interval 10 --eval-heldout-docs 20 --output-dir "$OUT/run")
python3 "${RUN[@]}" > "$OUT/trainer1.log" 2>&1 &
PID=$!
for _ in $(seq 600); do [ -f "$OUT/run/checkpoints/step_00000020/COMPLETE" ] && break; kill -0 $PID 2>/dev/null || break; sleep 0.5; done
kill -USR1 $PID 2>/dev/null; wait $PID; RC1=$?
python3 "${RUN[@]}" > "$OUT/trainer2.log" 2>&1; RC2=$?
grep -v "^\[20" "$OUT/trainer1.log" | tail -n 8 >&2; grep -v "^\[20" "$OUT/trainer2.log" | tail -n 12 >&2
python3 - "$OUT" "$RC1" "$RC2" <<'PY'
import json, sys, pathlib
out, rc1, rc2 = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
path = out / "gpu_check.json"
res = json.loads(path.read_text()) if path.exists() else {"bench_train": "failed, see bench_train.log"}
long_path = out / "long_context.json"
res["long_context_8192"] = json.loads(long_path.read_text()) if long_path.exists() else "failed, see long_context.log"
rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()] \
    if (out / "run" / "metrics.jsonl").exists() else []
train = [r for r in rows if r.get("kind") == "train"]
evals = [r for r in rows if r.get("kind") == "eval"]
log1 = (out / "trainer1.log").read_text(); log2 = (out / "trainer2.log").read_text()
res["trainer_fp16_zero2"] = {
    "exit_codes": [rc1, rc2], "stopped_on_signal": "stopped on signal" in log1,
    "resumed": "resumed from" in log2, "steps": train[-1]["step"] if train else None,
    "first_loss": train[0]["loss"] if train else None, "final_loss": train[-1]["loss"] if train else None,
    "tokens_per_s": train[-1].get("tokens_per_s") if train else None, "mfu": train[-1].get("mfu") if train else None,
    "loss_scale": train[-1].get("loss_scale") if train else None, "eval": evals[-1] if evals else None,
    "exported": (out / "run" / "export" / "config.json").exists(),
}
path.write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY

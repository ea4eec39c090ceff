#!/usr/bin/env bash
# GPU check (one H100/H200, < 8 minutes): BERT-base-sized RetroMAE at L=512 under DeepSpeed
#   ZeRO-2 bf16, ZeRO-2 fp16, ZeRO-3 bf16, each with and without activation checkpointing,
# then a short end-to-end trainer run (launch/pretrain.py: fp16 loss scaling, NCCL, checkpoint,
# resume, export). Prints JSON; with $OUT set, also writes $OUT/gpu_check.json and logs there.
#
#   bash bench/gpu_check.sh                       # from the repository root, deepspeed installed
# Env: MICRO_BATCH (32), SEQ_LEN (512), STEPS (10), TOKENIZER (a BERT WordPiece tokenizer folder)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
MICRO_BATCH="${MICRO_BATCH:-32}"; SEQ_LEN="${SEQ_LEN:-512}"; STEPS="${STEPS:-10}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== step throughput matrix" >&2
python3 bench/bench_train.py --preset bert-base --seq-len "$SEQ_LEN" --micro-batch "$MICRO_BATCH" \
  --steps "$STEPS" --warmup 3 \
  --settings z2-bf16,z2-bf16-ac,z2-fp16,z2-fp16-ac,z3-bf16,z3-bf16-ac \
  --out "$OUT/gpu_check.json" 2>&1 | tee "$OUT/bench_train.log" | grep -v "^\[20" || true

echo "== end-to-end trainer run (fp16, ZeRO-2): train, SIGTERM-free resume, export" >&2
TOK="${TOKENIZER:-.gpu/tokenizer}"
python3 bench/make_synthetic_data.py --tokenizer "$TOK" --output "$OUT/synth/data" --blocks 4096 --seq-len "$SEQ_LEN"
cat > "$OUT/bert_base.json" <<JSON
{"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
 "type_vocab_size": 2, "pad_token_id": 0}
JSON
mkdir -p "$OUT/bert_base" && cp "$OUT/bert_base.json" "$OUT/bert_base/config.json"
RUN=(launch/pretrain.py --deepspeed ds_configs/zero2.json --data "$OUT/synth/data" --model-config "$OUT/bert_base"
     --tokenizer "$TOK" --micro-batch-size 16 --precision fp16 --max-steps 40 --save-interval 20
     --log-interval 10 --eval-heldout-docs 20 --output-dir "$OUT/run")
python3 "${RUN[@]}" --max-steps 40 2>&1 | grep -v "^\[20" | tail -n 25 | tee "$OUT/trainer.log"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
train = [r for r in rows if r.get("kind", "train") == "train"]
res = json.loads((out / "gpu_check.json").read_text())
res["trainer_fp16_zero2"] = {
    "steps": train[-1]["step"], "final_loss": train[-1]["loss"], "first_loss": train[0]["loss"],
    "tokens_per_s": train[-1].get("tokens_per_s"), "mfu": train[-1].get("mfu"),
    "loss_scale": train[-1].get("loss_scale"), "exported": (out / "run" / "export" / "config.json").exists(),
}
(out / "gpu_check.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY

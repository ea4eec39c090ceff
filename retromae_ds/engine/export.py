"""Export a training checkpoint (any ZeRO stage) as a Hugging Face encoder folder.

OUT_DIR/                     AutoModel.from_pretrained(OUT_DIR) loads the encoder; AutoTokenizer too;
  config.json, model.safetensors, tokenizer files
  modules.json, sentence_bert_config.json, 1_Pooling/   sentence-transformers with [CLS] pooling
  retromae/                  the full RetroMAE state (encoder + MLM head + decoder, reference key
                             names lm.* / c_head.*) to continue pre-training with --model OUT_DIR/retromae

The weights are the fp32 master weights consolidated from the (possibly partitioned) ZeRO files, so
an export of a bf16/fp16 run loses nothing. Everything is written to a temporary folder first and
renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from retromae_ds.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint folder (OUTPUT_DIR/checkpoints/step_*) or a run's OUTPUT_DIR "
                             "(= its newest complete checkpoint)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the Hugging Face encoder to")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def main(args: argparse.Namespace) -> int:
    target = export_checkpoint(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"exported {target}")
    return 0


def load_checkpoint_model(checkpoint: str | Path):
    """Rebuild the RetroMAE module from a checkpoint folder and load its consolidated fp32 weights."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from retromae_ds.engine.checkpoint import consolidated_fp32_state, find_checkpoint
    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining

    path = find_checkpoint(checkpoint)
    files = path / "model_config"
    if not (files / "config.json").exists():
        raise UserError(f"{path}: missing model_config/config.json; this folder was not written by retromae-ds.")
    hf_config = AutoConfig.from_pretrained(files)
    tokenizer = AutoTokenizer.from_pretrained(files)
    settings = json.loads((files / "retromae_config.json").read_text())
    encoder = AutoModelForMaskedLM.from_config(hf_config)
    model = RetroMAEForPretraining(encoder, RetroMAEConfig(objective=settings["objective"],
                                                           bow_loss_weight=settings["bow_loss_weight"]))
    state = consolidated_fp32_state(path)
    missing, unexpected = _load(model, state)
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint weights do not match the model (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}).")
    model.lm.tie_weights()
    return model, tokenizer, settings, path


def _load(model, state):
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("decoder.weight")}
    missing = [k for k in result.missing_keys if k not in tied]
    return missing, list(result.unexpected_keys)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it or choose another OUT_DIR.")
    from safetensors import SafetensorError

    model, tokenizer, settings, path = load_checkpoint_model(checkpoint)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_sentence_transformers_files(tmp, hidden=model.lm.config.hidden_size,
                                          max_seq_len=int(settings.get("max_seq_len") or 512))
        model.save_pretrained(tmp / "retromae")
        tokenizer.save_pretrained(tmp / "retromae")
        (tmp / "retromae" / "exported_from.json").write_text(json.dumps({"checkpoint": str(path.resolve())}))
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, quota, permissions
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path(".")).free
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise UserError(f"{out}: writing the exported model failed ({reason}); {free:,} bytes are free there. "
                        f"Nothing was written (the temporary folder {tmp} was removed). Free space or choose "
                        f"another OUT_DIR, then run export again.") from None
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_sentence_transformers_files(folder: Path, hidden: int, max_seq_len: int) -> None:
    """sentence-transformers reads these to build Transformer -> CLS pooling (what RetroMAE trains)."""
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=1))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_len,
                                                                  "do_lower_case": False}, indent=1))
    pooling = folder / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    (pooling / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=1))

"""Export a training checkpoint (any ZeRO stage) as a Hugging Face encoder folder.

OUT_DIR/                     AutoModel.from_pretrained(OUT_DIR) loads the encoder; AutoTokenizer too;
  config.json, model.safetensors, tokenizer files
  modules.json, sentence_bert_config.json, 1_Pooling/   sentence-transformers with [CLS] pooling
  README.md                  what the folder is, how to load it, what its pooler is
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

from retromae_ds.engine.checkpoint import run_config
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
    from retromae_ds.hf_compat import make_config_portable, save_tokenizer  # 4.x loads the folder too
    from retromae_ds.model.retromae import ENCODER_DIR
    from retromae_ds.engine.checkpoint import read_marker

    marker = read_marker(path) or {}
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        identity_pooler = add_identity_pooler(model.encoder)
        try:
            model.encoder.save_pretrained(tmp)
            make_config_portable(tmp)
        finally:
            if identity_pooler:
                model.encoder.pooler = None  # the RetroMAE state below is the training module's, without it
        save_tokenizer(tokenizer, tmp)
        write_sentence_transformers_files(tmp, hidden=model.lm.config.hidden_size,
                                          max_seq_len=int(settings.get("max_seq_len") or 512))
        model.save_pretrained(tmp / "retromae")
        make_config_portable(tmp / "retromae" / ENCODER_DIR)
        save_tokenizer(tokenizer, tmp / "retromae")
        run = run_config(marker.get("client_state", {}))
        (tmp / "retromae" / "exported_from.json").write_text(json.dumps(
            {"checkpoint": str(path.resolve()), "evaluation": evaluation_record(run)}, indent=1))
        write_card(tmp, path, marker, settings, identity_pooler)
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, quota, permissions
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(write_failure_message(out, tmp, err)) from None
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def write_failure_message(out: Path, tmp: Path, err: Exception) -> str:
    """One paragraph for a failed export write, with the advice that fits its cause."""
    import errno

    code = getattr(err, "errno", None)
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    where = out.parent if out.parent.exists() else Path(".")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = (f"{where.resolve()} is not writable ({'a read-only filesystem' if code == errno.EROFS else 'permissions'}): "
               f"choose an OUT_DIR in a folder you can write to, or fix the folder's permissions")
    elif code in (errno.ENOSPC, errno.EDQUOT) or "No space" in reason or "quota" in reason.lower():
        free = shutil.disk_usage(where).free
        fix = f"{free:,} bytes are free there: free space or choose another OUT_DIR"
    else:  # not said by the error: a full disk is the usual cause of a failed write
        fix = f"{shutil.disk_usage(where).free:,} bytes are free there: fix the cause or choose another OUT_DIR"
    return (f"{out}: writing the exported model failed ({reason}). Nothing was written (the temporary folder "
            f"{tmp} was removed). {fix[0].upper()}{fix[1:]}, then run export again.")


def evaluation_record(run: dict) -> dict:
    """The settings of the run's own evaluation, for `retromae-ds eval EXPORT` to repeat it (see
    retromae_ds/evaluate.py run_evaluation_settings); {} when the checkpoint does not say."""
    keys = {"max_length": "eval_max_length", "heldout_docs": "eval_heldout_docs", "seed": "seed"}
    record = {name: run[key] for name, key in keys.items() if isinstance(run.get(key), int)}
    data = run.get("data")
    if record and isinstance(data, list) and data:
        record["data"] = str(data[0])
    return record


def add_identity_pooler(encoder) -> bool:
    """Give an encoder whose class has a pooler but which was built without one (BERT/RoBERTa/XLM-R inside
    their masked-LM model) an identity pooler: dense weight = I, bias = 0, so pooler_output = tanh([CLS]).

    Why: AutoModel.from_pretrained builds the pooler, and without its weights in the folder transformers
    reports `pooler.dense.* MISSING` at every load and initialises them at random, so `pooler_output`
    would differ from one load to the next. RetroMAE never trains the pooler (the embedding is the [CLS]
    hidden state); the identity makes the load complete and `pooler_output` deterministic. Returns True
    when it added one (the caller removes it again after saving the encoder)."""
    import torch
    from transformers import AutoModel

    if getattr(encoder, "pooler", "no such attribute") is not None:
        return False  # ModernBERT and others have none; a model that has one keeps it
    with torch.device("meta"):
        full = AutoModel.from_config(encoder.config)
    pooler = getattr(full, "pooler", None)
    dense = getattr(pooler, "dense", None)
    if (not isinstance(dense, torch.nn.Linear) or dense.in_features != dense.out_features
            or {name for name, _ in pooler.named_parameters()} != {"dense.weight", "dense.bias"}):
        return False
    identity = type(pooler)(encoder.config)
    with torch.no_grad():
        identity.dense.weight.copy_(torch.eye(dense.in_features))
        identity.dense.bias.zero_()
    encoder.pooler = identity.to(next(encoder.parameters()).dtype)
    return True


def write_card(folder: Path, checkpoint: Path, marker: dict, settings: dict, identity_pooler: bool) -> None:
    """README.md: what the folder holds and how to use it (a Hugging Face model card)."""
    run = run_config(marker.get("client_state", {}))
    source = run.get("model") or (f"random initialisation ({run.get('model_config')})" if run.get("model_config")
                                  else "?")
    lines = [
        "---", "tags:", "- retromae", "- feature-extraction", "- sentence-similarity", "---", "",
        "# RetroMAE encoder", "",
        f"Pre-trained with retromae-ds ([RetroMAE](https://arxiv.org/abs/2205.12035), objective "
        f"`{settings.get('objective')}`), "
        f"exported from the checkpoint `{checkpoint.resolve()}` (step {marker.get('step', '?')}), started from "
        f"{source}.", "",
        "## Use", "",
        "The sentence embedding is the [CLS] token's final hidden state (what RetroMAE trains):", "",
        "```python",
        "from transformers import AutoModel, AutoTokenizer",
        "model, tokenizer = AutoModel.from_pretrained(FOLDER), AutoTokenizer.from_pretrained(FOLDER)",
        "embedding = model(**tokenizer(texts, padding=True, truncation=True, return_tensors='pt')).last_hidden_state[:, 0]",
        "# or: sentence_transformers.SentenceTransformer(FOLDER).encode(texts)   ([CLS] pooling is configured)",
        "```", "",
    ]
    if identity_pooler:
        lines += [
            "## The pooler", "",
            "RetroMAE does not train BERT's pooler (`pooler.dense`: the dense + tanh layer over [CLS] that "
            "`pooler_output` comes from), and the training model has none. So that the folder loads completely "
            "(no `pooler.dense.* MISSING` report) and `pooler_output` is the same at every load, the export sets "
            "it to the identity: `pooler_output = tanh([CLS] hidden state)`. Use `last_hidden_state[:, 0]` (or "
            "sentence-transformers), not `pooler_output`, as the embedding.", "",
        ]
    lines += [
        "## Evaluate, continue", "",
        "`retromae-ds eval FOLDER --data PREFIX` repeats the run's final evaluation (its settings are in "
        "`retromae/exported_from.json`). `retromae/` holds the full RetroMAE state (encoder, MLM head, decoder): "
        "continue pre-training with `--model FOLDER/retromae`.", "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


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

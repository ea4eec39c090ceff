"""Named model sizes for `--model-config NAME`: random-init encoders without a config file.

    bert-tiny        2 layers, hidden 128, 2 heads, FFN 512     (the BERT miniatures, Turc et al. 2019)
    bert-mini        4 layers, hidden 256, 4 heads, FFN 1024
    bert-small       4 layers, hidden 512, 8 heads, FFN 2048
    bert-base       12 layers, hidden 768, 12 heads, FFN 3072
    modernbert-base  transformers' ModernBertConfig defaults (22 layers, hidden 768, 12 heads, FFN 1152, RoPE)

What comes from the run, not the preset:
- `vocab_size` = len(tokenizer) (every id the tokenizer can emit, added tokens included), and the special
  ids (pad, cls, sep, mask, bos, eos: those the config class has) from the tokenizer. An encoder's sequence
  starts with [CLS] and ends with [SEP], so a tokenizer without bos/eos tokens (BERT's) gives cls/sep there.
- `max_position_embeddings` = the training length (--max-seq-len, else the dataset's) rounded up to a
  multiple of 64. Why round: the table of a BERT preset is trained weights that a checkpoint stores, so
  its size must not depend on details; a later run at a slightly longer length (130 instead of 128 tokens,
  a tokenizer that adds a token) still fits, and the exported model accepts the rounded length. Why not
  BERT's customary 512: rows the run never trains stay random, and an exported model would claim a
  context it has never seen. (ModernBERT has no table; the number is what its config, and so the export,
  advertises.)

Built with `BertConfig(...)` / `ModernBertConfig(...)` directly: nothing is downloaded. The resolved config
is saved in every checkpoint (model_config/config.json) and in the export; a resume of a preset run reuses
the checkpoint's saved config (see retromae_ds/engine/build.py), so it never depends on the flags or the
transformers defaults of the day.
"""

from __future__ import annotations

from retromae_ds.errors import UserError

POSITION_MULTIPLE = 64

# name -> (config class name, overrides of its defaults)
PRESETS: dict[str, tuple[str, dict]] = {
    "bert-tiny": ("bert", dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)),
    "bert-mini": ("bert", dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)),
    "bert-small": ("bert", dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048)),
    "bert-base": ("bert", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "modernbert-base": ("modernbert", {}),
}
SPECIAL_IDS = ("pad", "cls", "sep", "mask", "bos", "eos")


def is_preset(name: str) -> bool:
    return name in PRESETS


def preset_list() -> str:
    """'bert-tiny (2 layers, hidden 128), ...' for error messages and --help."""
    shown = []
    for name, (_, values) in PRESETS.items():
        size = f"{values['num_hidden_layers']} layers, hidden {values['hidden_size']}" if values else "ModernBERT defaults"
        shown.append(f"{name} ({size})")
    return ", ".join(shown)


def positions_for(max_seq_len: int) -> int:
    """The position table for a training length: rounded up to a multiple of POSITION_MULTIPLE."""
    if max_seq_len < 1:
        raise UserError(f"a model preset needs the training length to size its position table; got {max_seq_len}.")
    return -(-int(max_seq_len) // POSITION_MULTIPLE) * POSITION_MULTIPLE


def special_ids(tokenizer) -> dict[str, int | None]:
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in SPECIAL_IDS}
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = ids["cls_token_id"]
    if ids["eos_token_id"] is None:
        ids["eos_token_id"] = ids["sep_token_id"]
    return ids


def preset_config(name: str, tokenizer, max_seq_len: int):
    """The Hugging Face config of preset `name` for this tokenizer and training length."""
    from transformers import BertConfig, ModernBertConfig

    if name not in PRESETS:
        raise UserError(f"--model-config {name}: not a preset; presets: {preset_list()}.")
    kind, values = PRESETS[name]
    config_class = {"bert": BertConfig, "modernbert": ModernBertConfig}[kind]
    values = {**values, "vocab_size": len(tokenizer), "max_position_embeddings": positions_for(max_seq_len)}
    defaults = config_class()
    for key, value in special_ids(tokenizer).items():
        if hasattr(defaults, key):  # only the ids this config class has
            values[key] = value
    config = config_class(**values)
    config.architectures = [{"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}[kind]]
    return config


def describe(name: str, config, length_source: str) -> str:
    """One line for the run's log: what the preset resolved to and where each number came from."""
    return (f"--model-config {name}: {type(config).__name__} with {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {config.num_attention_heads} heads, FFN {config.intermediate_size}; vocab "
            f"{config.vocab_size} (len(tokenizer)); {config.max_position_embeddings} positions ({length_source} "
            f"rounded up to a multiple of {POSITION_MULTIPLE}); random init")

"""Everything the trainer needs before its first step: demo defaults, data, tokenizer, model.

Kept apart from the loop so that trainer.py reads as the loop and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from retromae_ds.config import DEMO_DATA_PREFIX, TrainConfig
from retromae_ds.console import say
from retromae_ds.data.demo_corpus import minilm_path
from retromae_ds.errors import UserError

# The demo is sized for "a few minutes on 2 CPU cores" (one rank, fp32, MiniLM-L6, 128 tokens).
DEMO_DEFAULTS = dict(
    output_dir="runs/demo",
    max_seq_len=128,
    micro_batch_size=8,
    max_steps=100,
    lr=1e-4,
    warmup=0.1,
    log_interval=10,
    save_interval=50,
    eval_interval=50,
    eval_heldout_docs=50,
    eval_max_length=128,
)


def apply_demo_defaults(cfg: TrainConfig) -> None:
    """No --data/--model: train the bundled MiniLM on the bundled Wikipedia+news corpus."""
    cfg.data = [DEMO_DATA_PREFIX]
    cfg.model = minilm_path()
    for key, value in DEMO_DEFAULTS.items():
        if key not in cfg.explicit and not (key == "max_steps" and "epochs" in cfg.explicit):
            setattr(cfg, key, value)


def ensure_demo_data(cfg: TrainConfig, is_main: bool) -> None:
    """Rank 0 prepares the demo corpus if it is missing; the caller barriers afterwards."""
    prefix = cfg.data[0]
    if is_main and not Path(prefix + ".idx").exists():
        from retromae_ds.data.prepare import prepare_demo

        say(f"preparing the demo corpus at {prefix} (once)")
        prepare_demo(prefix, max_seq_len=cfg.max_seq_len or 128)


@dataclass
class DataBundle:
    train: object  # dataset with len/getitem -> np.ndarray of ids (no specials)
    train_sizes: object  # np.ndarray of block lengths of `train`
    heldout: list  # held-out blocks for retrieval evaluation
    fingerprints: list  # one dict per prefix (meta summary), stored in checkpoints
    meta: dict  # metadata of the first dataset
    retrieval: tuple = (None, None)  # (key prefix, RetrievalSet) of --eval-pairs/--eval-beir, scored each evaluation


def load_data(cfg: TrainConfig, tokenizer) -> DataBundle:
    import numpy as np

    from retromae_ds.data.indexed import BlendedDataset, BlockSubset, IndexedDataset, check_tokenizer_matches

    opened = []
    for prefix in cfg.data:
        ds = IndexedDataset(prefix)
        check_tokenizer_matches(ds.meta, tokenizer, prefix)
        opened.append(ds)
    fingerprints = [{"prefix": str(d.prefix), "num_blocks": len(d), "num_tokens": int(d.num_tokens),
                     "vocab_hash": d.meta["tokenizer"]["vocab_hash"]} for d in opened]
    first = opened[0]
    datasets = list(opened)
    heldout = []
    if cfg.eval_heldout_docs > 0:
        from retromae_ds.data.heldout import heldout_blocks

        check_heldout_docs(cfg.eval_heldout_docs, first.num_documents, first.prefix)
        train_blocks, heldout = heldout_blocks(first, cfg.eval_heldout_docs)
        datasets[0] = BlockSubset(first, 0, train_blocks)
    if len(datasets) == 1:
        train = datasets[0]
    else:
        weights = cfg.data_weights or [float(len(d)) for d in datasets]
        train = BlendedDataset(datasets, weights, seed=cfg.seed)
    # IndexedDataset, BlockSubset and BlendedDataset all carry per-block sizes (int32; an IndexedDataset's
    # stay memory-mapped: no per-rank copy of 4-8 bytes per block)
    sizes = np.asarray(train.sizes)
    return DataBundle(train=train, train_sizes=sizes, heldout=heldout, fingerprints=fingerprints, meta=first.meta,
                      retrieval=load_eval_set(cfg))


def load_eval_set(cfg: TrainConfig) -> tuple:
    """(key prefix, RetrievalSet) of --eval-pairs ("pairs") or --eval-beir ("beir"); (None, None) without."""
    from retromae_ds.data.retrieval_sets import load_beir, load_pairs

    if cfg.eval_pairs and cfg.eval_beir:
        raise UserError("--eval-pairs and --eval-beir both given: pass one retrieval set to evaluate on.")
    if cfg.eval_pairs:
        return "pairs", load_pairs(cfg.eval_pairs, query_field=cfg.eval_query_field,
                                   passage_field=cfg.eval_passage_field)
    if cfg.eval_beir:
        return "beir", load_beir(cfg.eval_beir, split=cfg.eval_beir_split)
    return None, None


def check_heldout_docs(heldout_docs: int, num_documents: int, prefix: str) -> None:
    if num_documents <= heldout_docs:
        raise UserError(f"--eval-heldout-docs {heldout_docs}: {prefix} has only {num_documents} documents; hold "
                        f"out fewer (or 0 to disable retrieval eval).")


def check_max_seq_len_fits_data(max_seq_len: int, metas: dict[str, dict]) -> None:
    """--max-seq-len may not exceed the longest max_seq_len the data was prepared with (`metas`: prefix ->
    PREFIX.json): the blocks are no longer than that, so longer positions would never be trained, yet a
    --model-config preset would add them to the model (and --static-shapes pad every batch to them)."""
    if not max_seq_len or not metas:
        return
    prepared = {prefix: int(meta["max_seq_len"]) for prefix, meta in metas.items() if "max_seq_len" in meta}
    if not prepared:
        return
    prefix, longest = max(prepared.items(), key=lambda item: item[1])
    if max_seq_len > longest:
        what = (f"{prefix} was prepared with max_seq_len {longest}" if len(prepared) == 1 else
                f"the longest of the --data prefixes ({prefix}) was prepared with max_seq_len {longest}")
        raise UserError(f"--max-seq-len {max_seq_len} is longer than the data: {what}, so no block is longer than "
                        f"{longest - 2} tokens plus [CLS]/[SEP], and positions beyond {longest} would never be "
                        f"trained (a --model-config preset would still add them to the model). Use --max-seq-len "
                        f"{longest} or less (0 = the data's), or prepare the data again with `retromae-ds prepare "
                        f"--max-seq-len {max_seq_len} ...` for longer blocks.")


def resolve_max_seq_len(cfg: TrainConfig, meta: dict, model_config) -> int:
    """The training length: --max-seq-len or the dataset's, checked against the model's position table
    (`model_config` is the built model's, so a table grown by --extend-positions counts)."""
    data_len = int(meta["max_seq_len"])
    max_len = cfg.max_seq_len or data_len
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is not None:
        from retromae_ds.model.positions import position_offset

        offset = position_offset(model_config)  # RoBERTa-family models reserve padding_idx + 1 rows
        if max_len + offset > positions:
            grow = (f", or grow the position table with --extend-positions {max_len}"
                    if not getattr(model_config, "rope_parameters", None) else "")
            raise UserError(f"--max-seq-len {max_len} exceeds the model's {positions - offset} positions "
                            f"(max_position_embeddings): lower --max-seq-len or re-run prepare with a smaller "
                            f"one{grow}.")
    return max_len


def load_tokenizer(cfg: TrainConfig):
    """The run's tokenizer: the folder --tokenizer names, else --model's (a RetroMAE folder's encoder_model/),
    loaded and checked by `retromae_ds.data.tokenizer.load_tokenizer`, as prepare loads it."""
    from retromae_ds.data import tokenizer as tokenizers

    path = cfg.tokenizer or cfg.model
    flag = "--tokenizer" if cfg.tokenizer else "--model"
    if not Path(path).exists():
        raise UserError(f"{flag} {path}: no such folder. Give a local Hugging Face model/tokenizer folder "
                        f"(nothing is downloaded at run time).")
    if (Path(path) / "encoder_model").is_dir() and not (Path(path) / "tokenizer_config.json").exists():
        path = str(Path(path) / "encoder_model")
    return tokenizers.load_tokenizer(path, flag)


def build_model(cfg: TrainConfig, tokenizer, resume_from: Path | None = None):
    """RetroMAE wrapper around the encoder; identical initialisation on every rank (seeded).
    `resume_from`: the checkpoint the run resumes from, as the trainer's Checkpointer decided (verified);
    a preset's config is then the one saved there."""
    import torch
    from transformers import AutoModelForMaskedLM

    from retromae_ds.model.retromae import RetroMAEConfig, RetroMAEForPretraining

    rcfg = RetroMAEConfig(objective=cfg.objective, bow_loss_weight=cfg.bow_loss_weight,
                          ce_chunk_size=cfg.ce_chunk_size or None)
    torch.manual_seed(cfg.seed)
    if cfg.model_config:
        hf_config = resolve_model_config(cfg, tokenizer, resume_from)
        if hf_config.vocab_size < len(tokenizer):
            raise UserError(f"--model-config {cfg.model_config}: vocab_size {hf_config.vocab_size} is smaller than "
                            f"the tokenizer's {len(tokenizer)} ids; set vocab_size >= {len(tokenizer)}.")
        encoder = AutoModelForMaskedLM.from_config(hf_config)
        model = RetroMAEForPretraining(encoder, rcfg)
    else:
        if not Path(cfg.model).exists():
            raise UserError(f"--model {cfg.model}: no such folder. Give a local Hugging Face model folder "
                            f"(nothing is downloaded at run time).")
        model = RetroMAEForPretraining.from_pretrained(cfg.model, config=rcfg)
    if cfg.extend_positions:
        apply_extend_positions(model, tokenizer, cfg.extend_positions)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def resolve_model_config(cfg: TrainConfig, tokenizer, resume_from: Path | None = None):
    """--model-config: an HF config.json or folder (an existing path wins), or a preset name
    (retromae_ds/model/presets.py). A preset is sized from the tokenizer (vocabulary, special ids) and the
    training length (position table); resuming (`resume_from`: the verified checkpoint) a run that started
    from the same preset reuses the config that checkpoint saved, so a resume never depends on the flags
    or transformers defaults of the day. A
    preset caps the tokenizer's model_max_length at the position table (saved with it), so an exported
    tokenizer never emits more tokens than the model has positions."""
    from transformers import AutoConfig

    from retromae_ds.model import presets

    name = cfg.model_config
    check_model_config_name(name)
    if Path(name).exists():
        if presets.is_preset(name):
            say(f"--model-config {name}: using the file/folder of that name here, not the preset")
        try:
            return AutoConfig.from_pretrained(name)
        except Exception as err:
            raise UserError(f"--model-config {name}: not a Hugging Face config ({err}).") from None
    saved = _saved_preset_config(cfg, resume_from)
    if saved is not None:
        config, where = AutoConfig.from_pretrained(saved), f"the config saved in {saved.parent}"
        say(f"--model-config {name}: resuming, so {where} is used "
            f"({config.max_position_embeddings} positions, vocab {config.vocab_size})")
    else:
        length, source = training_length(cfg)
        config = presets.preset_config(name, tokenizer, length)
        say(presets.describe(name, config, source))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings
    return config


def check_model_config_name(name: str) -> None:
    """--model-config must be an existing config file/folder or a preset name."""
    from retromae_ds.model import presets

    if not Path(name).exists() and not presets.is_preset(name):
        raise UserError(f"--model-config {name}: no such file or folder, and not a preset. Give an HF config.json "
                        f"or a folder holding one, or a preset: {presets.preset_list()}.")


def check_model_folder(path: str) -> None:
    """--model must be a local folder with a Hugging Face config.json, or a RetroMAE folder (encoder_model/)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--model {path}: no such folder. Give a local Hugging Face model folder "
                        f"(nothing is downloaded at run time).")
    if not (folder / "config.json").is_file() and not (folder / "encoder_model" / "config.json").is_file():
        raise UserError(f"--model {path}: no config.json in this folder, so it is not a Hugging Face model folder "
                        f"(save_pretrained output) or a RetroMAE folder (with encoder_model/). Point --model at the "
                        f"folder that holds config.json and the weights.")


def training_length(cfg: TrainConfig) -> tuple[int, str]:
    """(tokens per sample, where that came from): --max-seq-len, else the first dataset's max_seq_len
    (what resolve_max_seq_len trains at)."""
    if cfg.max_seq_len:
        return cfg.max_seq_len, f"--max-seq-len {cfg.max_seq_len}"
    from retromae_ds.data.indexed import dataset_paths, normalize_prefix

    if not cfg.data:
        raise UserError("a --model-config preset needs --max-seq-len or --data to size its position table.")
    meta_path = dataset_paths(normalize_prefix(cfg.data[0]))["json"]
    try:
        length = int(json.loads(Path(meta_path).read_text())["max_seq_len"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{meta_path}: cannot read the dataset's max_seq_len ({err}); pass --max-seq-len.") from None
    return length, f"the dataset's max_seq_len {length}"


def _saved_preset_config(cfg: TrainConfig, resume_from: Path | None) -> Path | None:
    """The model_config/ folder of `resume_from` (the checkpoint the trainer resumes from) when its run
    started from the same preset name; None otherwise (or when not resuming)."""
    from retromae_ds.engine import checkpoint as ckpt

    if resume_from is None:
        return None
    marker = ckpt.read_marker(Path(resume_from)) or {}
    started_with = ckpt.run_config(marker.get("client_state", {})).get("model_config")
    folder = Path(resume_from) / "model_config"
    return folder if started_with == cfg.model_config and (folder / "config.json").is_file() else None


def apply_extend_positions(model, tokenizer, positions: int) -> None:
    """--extend-positions N: grow the encoder's absolute position table to N tokens (rows copied block
    by block). The grown config travels with checkpoints (model_config/) and exports; the tokenizer's
    model_max_length grows too so exported tokenizers do not truncate at the old length. Resuming
    rebuilds the same table before DeepSpeed loads the trained rows over it."""
    from retromae_ds.model.positions import extend_position_table, token_positions

    before = token_positions(model.lm)
    if extend_position_table(model.lm, positions):
        say(f"position table extended from {before} to {positions} positions "
            f"(trained rows copied block by block)")
    if isinstance(getattr(tokenizer, "model_max_length", None), int) and tokenizer.model_max_length < positions:
        tokenizer.model_max_length = positions


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (every tensor with ndim < 2)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def write_model_files(model, tokenizer, cfg: TrainConfig, folder: Path) -> None:
    """What export needs to rebuild the module skeleton: HF config, tokenizer, RetroMAE settings."""
    folder.mkdir(parents=True, exist_ok=True)
    from retromae_ds.hf_compat import save_config, save_tokenizer

    save_config(model.lm.config, folder)  # both loadable by transformers 4.x too
    save_tokenizer(tokenizer, folder)
    (folder / "retromae_config.json").write_text(json.dumps(
        {"objective": cfg.objective, "bow_loss_weight": cfg.bow_loss_weight, "max_seq_len": cfg.max_seq_len},
        indent=1))


def count_params(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

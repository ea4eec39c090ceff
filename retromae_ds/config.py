"""The run configuration: one typed dataclass, filled from defaults < YAML file < command line.

Why one flat dataclass: every knob of a run is visible in one place, becomes a `--flag` and a YAML
key of the same name automatically, and is saved whole inside every checkpoint. The set of fields the
user gave explicitly is kept, so that a DeepSpeed JSON value that disagrees with an explicit flag is
an error rather than a silent override (see `retromae_ds/engine/ds_config.py`, which fills the DeepSpeed
JSON's "auto" fields from this config).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retromae_ds.errors import UserError

DEMO_DATA_PREFIX = "data/demo/minilm_128"
# Evaluation defaults, shared by the trainer (--seed, --eval-max-length, --eval-heldout-docs) and
# `retromae-ds eval` (--seed, --max-length, --heldout-docs), so that the two evaluate alike.
DEFAULT_SEED = 42
EVAL_MAX_LENGTH = 256
EVAL_HELDOUT_DOCS = 50


def _f(default, help: str, **kw):
    """A dataclass field carrying its --help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------
    data: list = _f([], "prepared dataset prefix(es) written by `retromae-ds prepare` (PREFIX.bin/.idx/.json)")
    data_weights: list = _f([], "blend weights, one per --data prefix (default: proportional to size)")
    max_seq_len: int = _f(0, "tokens per sample incl. [CLS]/[SEP], at most the dataset's max_seq_len (0 = the "
                             "dataset's); a smaller value cuts longer blocks")
    group_by_length: bool = _f(False, "group each global batch from samples of similar length (within windows of "
                                      "--group-window global batches, shuffled): little padding on corpora of short "
                                      "documents; the loss is then weighted per token. Resumable, every sample once "
                                      "per epoch")
    group_window: int = _f(256, "global batches per length-grouping window (the span over which samples are sorted "
                                "by length)")
    # --- model ------------------------------------------------------------------------------
    model: str = _f("", "HF masked-LM / encoder folder, or a RetroMAE folder (continues with its decoder)")
    model_config: str = _f("", "start from random init (needs --tokenizer): an HF config.json or folder, or a preset: "
                               "bert-tiny, bert-mini, bert-small, bert-base, modernbert-base (vocabulary and special "
                               "ids from --tokenizer, positions from --max-seq-len)")
    tokenizer: str = _f("", "tokenizer folder (default: the one inside --model)")
    objective: str = _f("retromae", "retromae | dupmae | mlm (encoder MLM only: the ablation baseline)",
                        choices=("retromae", "dupmae", "mlm"))
    bow_loss_weight: float = _f(1.0, "weight of the DupMAE bag-of-words loss")
    encoder_mask_ratio: float = _f(0.3, "encoder whole-word masking ratio")
    decoder_mask_ratio: float = _f(0.5, "decoder whole-word masking ratio (per attention row)")
    decoder_mask_pool: int = _f(128, "whole-word draws per sample that the decoder's attention rows pick from "
                                     "(the reference's 128); 0 = one draw per row")
    extend_positions: int = _f(0, "grow an absolute position table (BERT, XLM-R) to N positions by copying the "
                                  "trained rows block by block (0 = keep the model's)")
    ce_chunk_size: int = _f(0, "rows per chunk for the vocabulary projection + cross-entropy (0 = no chunking)")
    # --- optimisation -----------------------------------------------------------------------
    micro_batch_size: int = _f(8, "samples per rank per forward")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(0, "optimizer steps to train (0 = derive from --epochs)")
    epochs: float = _f(0.0, "passes over the training data (used when --max-steps is 0)")
    time_budget: str = _f("", "stop cleanly (checkpoint + exit 0) after this wall time, e.g. 3600, 90m, 23h30m")
    lr: float = _f(1e-4, "peak learning rate")
    warmup: float = _f(0.1, "warm-up: a fraction of the run if < 1, else a number of steps")
    schedule: str = _f("linear", "decay after warm-up; wsd = warm-up, stable at --lr, then a 1-sqrt decay over the "
                                 "last --decay-fraction of the run (its decay-start checkpoint is kept)",
                       choices=("linear", "cosine", "constant", "wsd"))
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of --lr")
    decay_fraction: float = _f(0.2, "wsd: the fraction of the run (at its end) over which the LR decays")
    new_parts_warmup_steps: int = _f(0, "continuing from a model that lacks an MLM head and/or the decoder (sentence-"
                                        "transformers, bge, e5: they start random): for the first N optimizer steps "
                                        "train only those new parts, the encoder's LR held at 0 (x --new-parts-"
                                        "encoder-lr-ratio), then the schedule's LR (0 = off; no effect from random init)")
    new_parts_encoder_lr_ratio: float = _f(0.0, "the encoder's LR during --new-parts-warmup-steps, as a fraction of the "
                                                "scheduled LR (0 = frozen)")
    weight_decay: float = _f(0.01, "AdamW weight decay (never applied to biases and LayerNorm weights)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    clip: float = _f(1.0, "gradient clipping by global norm (0 = off)")
    precision: str = _f("auto", "auto = bf16 on GPUs that have it, else fp16 on GPUs, fp32 on CPU",
                        choices=("auto", "bf16", "fp16", "fp32"))
    activation_checkpointing: bool = _f(False, "recompute encoder layers and the decoder in backward (less memory)")
    compile: bool = _f(False, "torch.compile the encoder's layers and the decoder layer (implies --static-shapes). The "
                              "first step compiles (minutes for big models). ZeRO stages 0-2")
    static_shapes: bool = _f(False, "pad every batch to --max-seq-len, so that every step has the same tensor shapes "
                                    "(what --compile needs; otherwise batches are padded to their longest block)")
    max_nonfinite_steps: int = _f(10, "stop after this many consecutive steps with a NaN/inf loss or gradient")
    # --- checkpoints, logging, evaluation ----------------------------------------------------
    output_dir: str = _f("runs/retromae", "checkpoints, metrics.jsonl, TensorBoard events and the exported model")
    save_interval: int = _f(500, "save a checkpoint every N steps (0 = only at the end / on a signal)")
    keep_last: int = _f(2, "complete checkpoints to keep")
    resume: str = _f("auto", "auto = newest complete checkpoint in --output-dir if any; a checkpoint path; none")
    seed: int = _f(DEFAULT_SEED, "seed of data order, masks, dropout and the decoder's initialisation")
    log_interval: int = _f(10, "log metrics every N steps")
    tensorboard_dir: str = _f("", "TensorBoard folder (default OUTPUT_DIR/tensorboard)")
    eval_interval: int = _f(0, "evaluate every N steps (0 = only at the end); Lee similarity, held-out retrieval and "
                                 "the decoder's [CLS] gain (eval/cls_gain)")
    eval_heldout_docs: int = _f(EVAL_HELDOUT_DOCS, "documents at the end of the first dataset held out for retrieval eval (0 = none)")
    eval_max_length: int = _f(EVAL_MAX_LENGTH, "max tokens per text in evaluation (capped at the model's positions)")
    eval_pairs: str = _f("", "query-passage pairs (.jsonl/.tsv/.csv/.parquet) whose zero-shot retrieval every evaluation "
                             "logs as eval/pairs/* (docs/metrics.md)")
    eval_beir: str = _f("", "a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) scored like --eval-pairs, as eval/beir/*")
    eval_beir_split: str = _f("test", "qrels split of --eval-beir")
    eval_query_field: str = _f("query", "query field of --eval-pairs")
    eval_passage_field: str = _f("passage", "passage field of --eval-pairs")
    export: bool = _f(True, "export the encoder (HF format) to OUTPUT_DIR/export at the end")
    profile_steps: str = _f("", "trace steps A-B with torch.profiler on rank 0, e.g. 20-25: a Perfetto/Chrome trace "
                                "and a table of the top operators in OUTPUT_DIR/profile/")
    peak_tflops: float = _f(0.0, "peak device TFLOPs for MFU (0 = look up the device type)")
    # --- DeepSpeed ----------------------------------------------------------------------------
    deepspeed: str = _f("ds_configs/zero2.json", "DeepSpeed JSON; its \"auto\" fields are filled from this config")
    # Why 60m: rank 0 alone reads whole checkpoints while every other rank waits in a collective, at most
    # twice in one wait (export: full checksum verification, then consolidation of the fp32 weights; a
    # resume verifies and consolidates with a collective between the two). Largest checkpoint we plan
    # for: XLM-R XL, 3.5e9 parameters x 16 bytes (fp32 weights + fp32 master + Adam m and v) = 56 GB.
    # Read twice at a conservative 50 MB/s from a busy shared filesystem: 112 GB / 50 MB/s = 2,240 s
    # (37 min); xxh3 hashing at ~9 GB/s adds 12 s. 60 min leaves ~1.6x headroom (XLM-R large, 9 GB:
    # 6 min). DeepSpeed's 10-minute default covers 15 GB at that rate. The cost: a rank that hangs, or
    # dies without its launcher stopping the others, is reported only after this long.
    dist_timeout: str = _f("60m", "how long a collective waits for the slowest rank before the job fails, e.g. 60m, "
                                  "2h, 3600 (seconds); covers rank 0 reading a 56 GB checkpoint twice at 50 MB/s")

    # Names the user set explicitly (YAML or CLI); not a flag.
    explicit: set = field(default_factory=set, metadata={"internal": True})
    # The --config file and the names whose value came from it (error messages say where a path was given).
    yaml_file: str = field(default="", metadata={"internal": True})
    from_yaml: set = field(default_factory=set, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("internal")}

    @property
    def is_demo(self) -> bool:
        return not self.data and not self.model and not self.model_config


def config_fields():
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("internal")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field; defaults are suppressed so we can tell what the user set."""
    parser.add_argument("--config", metavar="RUN.yaml", help="YAML file with any of the flags below (CLI wins)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if f.metadata["help"] is not argparse.SUPPRESS:
            kw["help"] = f"{f.metadata['help']} (default: {default!r})" if default not in ("", [], 0) else f.metadata["help"]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kw["nargs"] = "+"
            kw["type"] = float if f.name == "data_weights" else str
        else:
            kw["type"] = type(default)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def _coerce(name: str, value: Any, source: str) -> Any:
    f = {f.name: f for f in config_fields()}[name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, list):
            return list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: `{name}` must be a {type(default).__name__}, got {value!r}.") from None


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such file. Give the path of a YAML file with run settings.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({err}).") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of setting: value, got {type(data).__name__}.")
    known = {f.name for f in config_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = [k for k in known if k.startswith(name[:4])]
            hint = f" Did you mean {', '.join(sorted(close))}?" if close else ""
            raise UserError(f"--config {path}: unknown setting `{key}`.{hint} See `retromae-ds train --help`.")
        out[name] = _coerce(name, value, f"--config {path}")
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    from_yaml = set(values)
    known = {f.name for f in config_fields()}
    cli = {k: v for k, v in vars(args).items() if k in known}
    values.update(cli)
    cfg = TrainConfig(**values)
    cfg.explicit = set(values)
    if getattr(args, "config", None):
        cfg.yaml_file, cfg.from_yaml = str(args.config), from_yaml - set(cli)
    validate(cfg)
    return cfg


def path_origin(cfg: TrainConfig, name: str, value: str | None = None) -> str:
    """Where a path setting came from, for error messages: '' for the command line (or a default), else
    a sentence saying that a relative path in the --config file resolves against the current folder."""
    if name not in cfg.from_yaml:
        return ""
    value = getattr(cfg, name) if value is None else value
    values = value if isinstance(value, list) else [value]
    if not any(v and not os.path.isabs(str(v)) for v in values):
        return f" (`{name}` in {cfg.yaml_file})"
    return (f" (`{name}` in {cfg.yaml_file}: a relative path there resolves against the current folder "
            f"{os.getcwd()}, not the YAML file's folder; give an absolute path or start from that folder)")


def validate(cfg: TrainConfig) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise UserError(msg)

    need(cfg.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {cfg.micro_batch_size}.")
    need(cfg.grad_accum >= 1, f"--grad-accum must be >= 1, got {cfg.grad_accum}.")
    need(cfg.group_window >= 1, f"--group-window must be >= 1 (global batches per length-grouping window), "
                                f"got {cfg.group_window}.")
    need(cfg.max_steps >= 0 and cfg.epochs >= 0, "--max-steps and --epochs must be >= 0.")
    need(0 < cfg.encoder_mask_ratio < 1 and 0 < cfg.decoder_mask_ratio < 1,
         "--encoder-mask-ratio and --decoder-mask-ratio must be in (0, 1).")
    need(cfg.decoder_mask_pool >= 0, f"--decoder-mask-pool must be >= 0 (0 = one draw per row), got {cfg.decoder_mask_pool}.")
    need(cfg.extend_positions >= 0, f"--extend-positions must be >= 0, got {cfg.extend_positions}.")
    need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}.")
    need(cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}.")
    need(cfg.new_parts_warmup_steps >= 0, f"--new-parts-warmup-steps must be >= 0 (optimizer steps), got "
                                          f"{cfg.new_parts_warmup_steps}.")
    need(0 <= cfg.new_parts_encoder_lr_ratio <= 1, f"--new-parts-encoder-lr-ratio must be in [0, 1] (a fraction of "
                                                   f"the scheduled LR), got {cfg.new_parts_encoder_lr_ratio}.")
    need(0 <= cfg.decay_fraction <= 1, f"--decay-fraction must be in [0, 1] (a fraction of the run), got {cfg.decay_fraction}.")
    need(cfg.keep_last >= 1, f"--keep-last must be >= 1, got {cfg.keep_last}.")
    need(cfg.log_interval >= 1, f"--log-interval must be >= 1, got {cfg.log_interval}.")
    need(not cfg.data_weights or len(cfg.data_weights) == len(cfg.data),
         f"--data-weights has {len(cfg.data_weights)} values for {len(cfg.data)} --data prefixes: give one weight per prefix.")
    need(not (cfg.model and cfg.model_config),
         "--model and --model-config both given: use --model to start from weights, or --model-config "
         "(+ --tokenizer) to start from random initialisation.")
    need(not cfg.model_config or cfg.tokenizer, "--model-config needs --tokenizer (the vocabulary the data was prepared with).")
    need(cfg.is_demo or cfg.data, "--data is required when --model/--model-config is given (prepare it with `retromae-ds prepare`).")
    need(cfg.is_demo or cfg.model or cfg.model_config, "--model (or --model-config + --tokenizer) is required with --data.")
    parse_time_budget(cfg.time_budget)
    parse_dist_timeout(cfg.dist_timeout)
    parse_profile_steps(cfg.profile_steps)


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'' -> None; '20-25' -> (20, 25); '7' -> (7, 7): the first and last step to trace (steps count from 1)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", str(text))
    first, last = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else (0, 0)
    if not m or first < 1 or last < first:
        raise UserError(f"--profile-steps {text!r}: give the first and last step to trace, e.g. 20-25 "
                        f"(steps count from 1; a few steady-state steps after the first ones are typical).")
    return first, last


def _duration_seconds(text: str) -> float | None:
    """'3600' -> 3600.0; '90m', '1h30m', '2d' -> seconds; anything else -> None."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    m = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not any(m.groups()):
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + s)


def parse_time_budget(text: str) -> float | None:
    """'' -> None; '3600' -> 3600 s; '90m', '1h30m', '2d' -> seconds."""
    if not text:
        return None
    seconds = _duration_seconds(text)
    if seconds is None:
        raise UserError(f"--time-budget {str(text).strip()!r}: use seconds (3600) or a duration like 90m, 23h30m, 2d.")
    return seconds


def parse_dist_timeout(text: str) -> float:
    """--dist-timeout in seconds ('60m' -> 3600.0; a bare number is seconds); must be > 0."""
    seconds = _duration_seconds(text)
    if seconds is None or seconds <= 0:
        raise UserError(f"--dist-timeout {str(text).strip()!r}: give how long a collective may wait, > 0, in "
                        f"seconds (3600) or as a duration like 60m, 2h, 1h30m.")
    return seconds

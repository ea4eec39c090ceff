"""Check a training run's inputs before anything slow starts.

`Trainer.setup()` calls `check_inputs(cfg)` before DeepSpeed starts its process group (which on a CPU
machine includes compiling DeepSpeed's shared-memory extension the first time: a minute or more). So a
missing --data prefix, a tokenizer that did not prepare the data, a bad path in a --config YAML, a
missing --deepspeed JSON or an --output-dir that cannot be written is reported within seconds, as one
paragraph and exit 2, and nothing is created on disk.

The checks reuse the code that acts on the same inputs later (reading a dataset's metadata, loading the
tokenizer and comparing its fingerprint with the one the data recorded, finding a DeepSpeed JSON, a
checkpoint, a model config), so the two cannot disagree; what only the later steps can know (the model's
position table, a damaged .bin file, checkpoint checksums) is still checked there.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from retromae_ds import config as config_mod
from retromae_ds.config import TrainConfig
from retromae_ds.errors import UserError


def check_inputs(cfg: TrainConfig) -> None:
    """Raise UserError for the first problem with the run's flags, paths and data. Does not change `cfg`;
    writes nothing. Takes about as long as loading the tokenizer (well under 5 s)."""
    from retromae_ds.engine import build

    config_mod.validate(cfg)
    demo = cfg.is_demo
    if demo:  # the demo's data and model, as the trainer will apply them (on a copy: setup applies them again)
        cfg = copy.deepcopy(cfg)
        build.apply_demo_defaults(cfg)
    # the data: rank 0 prepares the demo corpus after start-up when it is missing, with the demo's tokenizer
    metas = {} if demo else {prefix: _from(cfg, "data", _read_meta, prefix) for prefix in cfg.data}
    if cfg.model:
        _from(cfg, "model", build.check_model_folder, cfg.model)
    if cfg.model_config:
        _from(cfg, "model_config", build.check_model_config_name, cfg.model_config)
    tokenizer = _from(cfg, "tokenizer" if cfg.tokenizer else "model", build.load_tokenizer, cfg)
    if metas:
        from retromae_ds.data.indexed import check_tokenizer_matches

        for prefix, meta in metas.items():
            check_tokenizer_matches(meta, tokenizer, prefix)
        build.check_max_seq_len_fits_data(cfg.max_seq_len, metas)
        first = cfg.data[0]
        if cfg.eval_heldout_docs > 0 and "num_documents" in metas[first]:
            build.check_heldout_docs(cfg.eval_heldout_docs, int(metas[first]["num_documents"]), first)
    if cfg.eval_pairs or cfg.eval_beir:
        _from(cfg, "eval_pairs" if cfg.eval_pairs else "eval_beir", build.load_eval_set, cfg)
    _check_resume(cfg)
    from retromae_ds.engine.ds_config import load_deepspeed_json

    _from(cfg, "deepspeed", load_deepspeed_json, cfg.deepspeed)
    _from(cfg, "output_dir", check_writable_folder, cfg.output_dir, "--output-dir")
    if cfg.tensorboard_dir:
        _from(cfg, "tensorboard_dir", check_writable_folder, cfg.tensorboard_dir, "--tensorboard-dir")


def output_dir_of(cfg: TrainConfig) -> Path:
    """The folder the run will write to (the demo's default when the demo runs without --output-dir)."""
    if cfg.is_demo and "output_dir" not in cfg.explicit:
        from retromae_ds.engine.build import DEMO_DEFAULTS

        return Path(DEMO_DEFAULTS["output_dir"])
    return Path(cfg.output_dir)


def check_writable_folder(path: str, flag: str) -> None:
    """`path` is a folder this process can write in, or can be created (its nearest existing parent is a
    writable folder). Nothing is created."""
    target = Path(path)
    existing = target
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise UserError(f"{flag} {path}: {existing} is a broken symbolic link. Remove it or choose another "
                            f"{flag}.")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder. Choose another {flag}.")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "it is on a read-only filesystem" if read_only else "this user may not write there (permissions)"
    what = f"{existing} is not writable" if existing == target else f"cannot create it: {existing} is not writable"
    raise UserError(f"{flag} {path}: {what}, as {why}. Nothing was started. Choose a {flag} in a folder you can "
                    f"write to (on several nodes, one that every node sees), or fix the folder's permissions.")


def remove_if_left_empty(folder: Path) -> None:
    """After a failed start: remove `folder` when it holds no file at all (only empty sub-folders), so that
    a run that never began leaves nothing behind. A folder with any file in it is kept."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for _, _, files in os.walk(folder):
        if files:
            return
    for root, dirs, _ in os.walk(folder, topdown=False):  # the deepest folders first
        for name in dirs:
            try:
                os.rmdir(os.path.join(root, name))
            except OSError:
                pass
    try:
        folder.rmdir()
    except OSError:
        pass


def _read_meta(prefix: str) -> dict:
    from retromae_ds.data.indexed import read_meta

    return read_meta(prefix)


def _check_resume(cfg: TrainConfig) -> None:
    from retromae_ds.engine.checkpoint import NO_RESUME, find_checkpoint

    if cfg.resume == "auto" or cfg.resume in NO_RESUME:
        return

    try:
        find_checkpoint(cfg.resume, verify_files=False)  # checksums are verified after start-up (rank 0)
    except UserError as err:
        raise UserError(f"--resume {err} Give a checkpoint folder (OUTPUT_DIR/checkpoints/step_*), a run's "
                        f"--output-dir, auto or none.{config_mod.path_origin(cfg, 'resume')}") from None


def _from(cfg: TrainConfig, name: str, check, *args):
    """Run one check of the setting `name`; its error says so when the value came from the YAML file (where
    a relative path resolves against the current folder, which surprises)."""
    try:
        return check(*args)
    except UserError as err:
        origin = config_mod.path_origin(cfg, name)
        if not origin:
            raise
        raise UserError(f"{err}{origin}") from None

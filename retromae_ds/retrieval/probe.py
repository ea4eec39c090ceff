"""Fine-tune probe: how good a starting point for a retriever is this encoder (or each checkpoint of a run)?

The field judges a pre-trained retriever by its retrieval after a contrastive fine-tune, not zero-shot.
The probe is a short, fixed one: [CLS] pooling, InfoNCE with in-batch negatives (sentence-transformers'
MultipleNegativesRankingLoss; its cached variant when --mini-batch-size asks for a batch larger than
memory allows), an optional hard-negative column, a fixed number of steps, batch, learning rate and seed.
Before and after it, the encoder is scored on the evaluation set (:mod:`retromae_ds.retrieval.evaluation`).

Two named settings: ``retromae-paper`` (dot product, temperature 1: RetroMAE's bi-encoder) and ``bge``
(cosine, temperature 0.02). The zero-shot line is always cosine: an encoder that never learned a dot
product's scale is judged on its angles.

With ``--val-pairs`` the fine-tune is a full one instead: it is scored on that held-out set every
``--eval-every`` steps, stops once nDCG@10 there has not improved for ``--patience`` evaluations (at most
``--steps``), and keeps its best state (the trainer's early stopping and best-model reload). This is the
reference a short probe is checked against: until held-out retrieval is flat, not a length chosen ahead.

On a run folder every complete checkpoint is exported on the fly and probed, oldest first; the results go
to OUT/probe-SETTING-HASH.json after each checkpoint (a killed probe keeps what it finished, and a second
call probes only what is new; HASH names the settings, so other settings start their own file), with a
PNG of the after-fine-tune metric against the pre-training step beside the zero-shot curve and BM25.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from retromae_ds.console import say
from retromae_ds.errors import UserError
from retromae_ds.evaluate import write_json_atomic

SETTINGS = {
    "retromae-paper": {"similarity": "dot", "temperature": 1.0},
    "bge": {"similarity": "cos", "temperature": 0.02},
}
STEPS, BATCH, LR, WARMUP, MAX_LENGTH = 600, 32, 5e-5, 0.1, 128
PATIENCE, EVALUATIONS = 5, 20  # early stopping: evaluations without a gain; default evaluations per --steps
VALIDATION_FIELDS = ("val_pairs", "val_queries", "eval_every", "patience")
CURVE_METRICS = ("ndcg10", "mrr10")
PER_QUERY_KEPT = ("ndcg10", "mrr10")  # per-query values saved for paired statistics


@dataclass(frozen=True)
class ProbeSettings:
    setting: str = "retromae-paper"
    steps: int = STEPS
    batch_size: int = BATCH
    mini_batch_size: int = 0  # 0: plain in-batch negatives; else the cached loss in slices of this many
    learning_rate: float = LR
    warmup: float = WARMUP
    max_length: int = MAX_LENGTH
    seed: int = 0
    train_pairs: str = ""
    train_rows: int = 0
    eval_source: str = ""
    eval_queries: int = 0
    val_pairs: str = ""  # "": a fixed --steps fine-tune; else early stopping on this held-out set
    val_queries: int = 0
    eval_every: int = 0
    patience: int = 0

    @property
    def similarity(self) -> str:
        return SETTINGS[self.setting]["similarity"]

    @property
    def temperature(self) -> float:
        return SETTINGS[self.setting]["temperature"]

    def key(self) -> str:
        """A short hash of everything that changes the numbers: results with other settings go elsewhere.
        A fixed-length probe hashes as it did before early stopping existed, so its results stay found."""
        fields = asdict(self)
        if not self.val_pairs:
            for name in VALIDATION_FIELDS:
                del fields[name]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def held_out_evaluator(val_set, settings: ProbeSettings):
    """A sentence-transformers evaluator scoring [CLS] on the held-out set with the setting's similarity, by
    this project's metrics (:func:`retromae_ds.retrieval.evaluation.score_set`); nDCG@10 picks the best."""
    from sentence_transformers.base.evaluation import BaseEvaluator

    from retromae_ds.retrieval.evaluation import score_set

    class HeldOutRetrieval(BaseEvaluator):
        def __init__(self):
            super().__init__()
            self.primary_metric = "ndcg10"

        def __call__(self, model, output_path=None, epoch=-1, steps=-1) -> dict[str, float]:
            scores = score_set(model[0].auto_model, model[0].tokenizer, val_set, prefix="val",
                               max_length=settings.max_length, device=model.device, similarity=settings.similarity)
            return {name: scores.metrics[f"val/{name}_cls"] for name in CURVE_METRICS}

    return HeldOutRetrieval()


def fine_tune(model_dir: str, train: dict[str, list[str]], settings: ProbeSettings, work_dir: str, val_set=None):
    """sentence-transformers' trainer on ``train`` ({"anchor", "positive"[, "negative"]} columns) from the
    encoder in ``model_dir``: returns (the fine-tuned Hugging Face encoder, its tokenizer, final loss, and
    with ``val_set`` the held-out history: {"history": [[step, nDCG@10], ...], "best_step", "stopped_at"})."""
    import datasets
    import torch
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from sentence_transformers.util import cos_sim, dot_score
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per checkpoint the early stopping writes says nothing
    transformer = Transformer(model_dir, max_seq_length=settings.max_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    cuda = torch.cuda.is_available()
    model = SentenceTransformer(modules=[transformer, pooling], device="cuda" if cuda else "cpu")
    similarity = dot_score if settings.similarity == "dot" else cos_sim
    scale = 1.0 / settings.temperature
    if settings.mini_batch_size:
        loss = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity,
                                                         mini_batch_size=settings.mini_batch_size)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity)
    args = SentenceTransformerTrainingArguments(
        output_dir=work_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, warmup_steps=settings.warmup, lr_scheduler_type="linear",
        seed=settings.seed, data_seed=settings.seed, batch_sampler="no_duplicates", report_to="none",
        logging_steps=max(1, settings.steps // 10), disable_tqdm=True, use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), dataloader_drop_last=True, **early_stopping(settings))
    callbacks = []
    if val_set is not None:
        from transformers import EarlyStoppingCallback
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=settings.patience))
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict(train), loss=loss, callbacks=callbacks,
        evaluator=held_out_evaluator(val_set, settings) if val_set is not None else None)
    output = trainer.train()
    encoder = model[0].auto_model.float()  # with early stopping: the best state, reloaded by the trainer
    validation = None
    if val_set is not None:
        state = trainer.state
        validation = {"history": [[e["step"], e["eval_ndcg10"]] for e in state.log_history if "eval_ndcg10" in e],
                      "best_step": state.best_global_step, "best_ndcg10": state.best_metric,
                      "stopped_at": state.global_step}
    return encoder, model[0].tokenizer, float(output.training_loss), validation


def early_stopping(settings: ProbeSettings) -> dict:
    """The trainer's arguments: no checkpoints for a fixed-length probe; with a held-out set, an evaluation
    and a checkpoint of the weights alone every --eval-every steps (the best one is kept and reloaded at the
    end; no optimizer state: it is never resumed)."""
    if not settings.val_pairs:
        return {"save_strategy": "no"}
    return {"eval_strategy": "steps", "eval_steps": settings.eval_every, "save_strategy": "steps",
            "save_steps": settings.eval_every, "save_total_limit": 1, "save_only_model": True,
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_ndcg10", "greater_is_better": True}


def probe_encoder(model_dir: str, train: dict, eval_set, prefix: str, settings: ProbeSettings,
                  val_set=None) -> dict:
    """Zero-shot (cosine) and after-fine-tune (the setting's similarity) scores of one encoder folder."""
    import torch

    from retromae_ds.evaluate import evaluation_length, load_encoder
    from retromae_ds.retrieval.evaluation import score_set

    start = time.perf_counter()
    encoder, tokenizer = load_encoder(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    length = evaluation_length(settings.max_length, encoder)
    if length < settings.max_length:
        raise UserError(f"{model_dir} has {length} positions, fewer than --max-length {settings.max_length}; "
                        f"pass --max-length {length} or less.")
    kw = dict(prefix=prefix, max_length=length, seed=settings.seed, resamples=1000)
    before = score_set(encoder, tokenizer, eval_set, similarity="cos", device=device, **kw)
    del encoder
    with tempfile.TemporaryDirectory(prefix="probe-") as work:
        tuned, tuned_tokenizer, loss, validation = fine_tune(model_dir, train, settings, work, val_set)
        after = score_set(tuned, tuned_tokenizer, eval_set, similarity=settings.similarity,
                          device=next(tuned.parameters()).device, **kw)
    extra = {"validation": validation} if validation else {}
    return {"zero_shot": before.metrics, "after": after.metrics, "train_loss": loss, **extra,
            "per_query": {stage: {metric: [round(float(v), 6) for v in scores.per_query["cls"][metric]]
                                  for metric in PER_QUERY_KEPT if metric in scores.per_query["cls"]}
                          for stage, scores in (("zero_shot", before), ("after", after))},
            "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------------------------
# A run folder: every kept checkpoint
# ------------------------------------------------------------------------------------------------

def results_path(out_dir: Path, settings: ProbeSettings) -> Path:
    return out_dir / f"probe-{settings.setting}-{settings.key()}.json"


def load_results(path: Path, settings: ProbeSettings) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path} is not valid JSON (a probe's results); delete it to probe again.") from None
    return {"settings": asdict(settings), "checkpoints": []}


def probe_run(run_dir: str, out_dir: Path, train: dict, eval_set, prefix: str, settings: ProbeSettings,
              val_set=None) -> dict:
    """Probe each complete checkpoint of ``run_dir`` not yet in the results file; returns the results."""
    from retromae_ds.engine.checkpoint import complete_checkpoints
    from retromae_ds.engine.export import export_checkpoint
    from retromae_ds.retrieval.evaluation import score_bm25

    checkpoints = complete_checkpoints(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path(out_dir, settings)
    results = load_results(path, settings)
    if "bm25" not in results:
        results["bm25"] = score_bm25(eval_set, prefix=prefix)
    done = {entry["checkpoint"] for entry in results["checkpoints"]}
    todo = [c for c in checkpoints if c.name not in done]
    say(f"probing {len(todo)} of {len(checkpoints)} checkpoints of {run_dir} "
        f"({len(done)} already in {path})")
    for checkpoint in todo:
        step = int(checkpoint.name.split("_")[-1])
        export_dir = Path(tempfile.mkdtemp(prefix=".probe-export-", dir=out_dir))
        try:
            export_checkpoint(checkpoint, export_dir / "encoder")
            entry = probe_encoder(str(export_dir / "encoder"), train, eval_set, prefix, settings, val_set)
        finally:
            shutil.rmtree(export_dir, ignore_errors=True)
        results["checkpoints"].append({"checkpoint": checkpoint.name, "step": step, **entry})
        results["checkpoints"].sort(key=lambda e: e["step"])
        write_json_atomic(path, results)
        say(f"{checkpoint.name}: {summary(entry, prefix)} ({entry['seconds']:.0f} s)")
    plot_curve(results, prefix, path.with_suffix(".png"))
    return results


def summary(entry: dict, prefix: str) -> str:
    before, after = entry["zero_shot"], entry["after"]
    text = ", ".join(f"{name} {before[f'{prefix}/{name}_cls']:.4f} -> {after[f'{prefix}/{name}_cls']:.4f}"
                     for name in CURVE_METRICS)
    if "validation" in entry:
        v = entry["validation"]
        text += f" (best held-out nDCG@10 {v['best_ndcg10']:.4f} at step {v['best_step']}, stopped at {v['stopped_at']})"
    return text


def plot_curve(results: dict, prefix: str, png: Path) -> bool:
    """After-fine-tune and zero-shot [CLS] metrics against the pre-training step, BM25 as a line; False (and a
    note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say(f"matplotlib is not installed: no {png.name} (pip install matplotlib); the numbers are in the JSON")
        return False
    entries = results["checkpoints"]
    steps = [e["step"] for e in entries]
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 3.8))
    for ax, name in zip(axes, CURVE_METRICS):
        key = f"{prefix}/{name}_cls"
        for stage, label, style in (("after", "after the fine-tune", "-o"), ("zero_shot", "zero-shot (cosine)", "--s")):
            values = [e[stage][key] for e in entries]
            ax.plot(steps, values, style, label=label)
            if all(f"{key}_lo" in e[stage] for e in entries):
                ax.fill_between(steps, [e[stage][f"{key}_lo"] for e in entries],
                                [e[stage][f"{key}_hi"] for e in entries], alpha=0.2)
        if f"{prefix}/{name}_bm25" in results.get("bm25", {}):
            ax.axhline(results["bm25"][f"{prefix}/{name}_bm25"], color="gray", linestyle=":", label="BM25")
        ax.set_xlabel("pre-training step")
        ax.set_ylabel(f"{name} ([CLS])")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    s = results["settings"]
    fig.suptitle(f"probe {s['setting']}: {s['steps']} steps, batch {s['batch_size']}, lr {s['learning_rate']:g}, "
                 f"seed {s['seed']} (bands: 95% intervals over queries)", fontsize=9)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return True


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from retromae_ds.evaluate import add_set_arguments

    parser.add_argument("target", metavar="ENCODER_OR_RUN_DIR",
                        help="a Hugging Face encoder folder (e.g. an export), or a run's --output-dir: then every "
                             "complete checkpoint in it is probed")
    parser.add_argument("--train-pairs", metavar="FILE", required=True,
                        help="query-passage pairs to fine-tune on (same formats and field flags as --pairs); "
                             "keep them apart from the evaluation set")
    parser.add_argument("--negative-field", metavar="NAME", default=None,
                        help="a hard-negative passage column of --train-pairs (default: in-batch negatives only)")
    parser.add_argument("--setting", choices=tuple(SETTINGS), default="retromae-paper",
                        help="retromae-paper: dot product, temperature 1 (default); bge: cosine, temperature 0.02")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"fine-tuning steps (default {STEPS}); with --val-pairs, the most it may take")
    parser.add_argument("--batch-size", type=int, default=BATCH,
                        help=f"pairs per step; each query's negatives are the batch's other passages (default {BATCH})")
    parser.add_argument("--mini-batch-size", type=int, default=0, metavar="N",
                        help="use the cached loss: a --batch-size batch in slices of N (a big batch on one GPU)")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate, linear decay (default {LR:g})")
    parser.add_argument("--warmup", type=float, default=WARMUP, help=f"warm-up fraction of --steps (default {WARMUP})")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help=f"tokens per text incl. [CLS]/[SEP] (default {MAX_LENGTH})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fine-tune and the intervals (default 0)")
    parser.add_argument("--val-pairs", metavar="FILE", default=None,
                        help="a full fine-tune instead of the fixed probe: score [CLS] on these held-out pairs (same "
                             "formats and field flags as --pairs; apart from both other sets) every --eval-every "
                             "steps, stop when nDCG@10 there has not improved for --patience evaluations, keep the "
                             "best state")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help=f"steps between held-out evaluations (default: --steps / {EVALUATIONS})")
    parser.add_argument("--patience", type=int, default=PATIENCE, metavar="K",
                        help=f"evaluations without a gain before stopping (default {PATIENCE})")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where the results go (default: RUN_DIR/probe for a run; none for an encoder folder)")
    add_set_arguments(parser)


def main(args) -> int:
    from retromae_ds.data.retrieval_sets import load_pairs, load_training_pairs
    from retromae_ds.engine.checkpoint import complete_checkpoints
    from retromae_ds.evaluate import load_retrieval_set

    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                             ("--max-length", args.max_length, 3), ("--mini-batch-size", args.mini_batch_size, 0)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}.")
    if not 0 <= args.warmup < 1:
        raise UserError(f"--warmup is a fraction of --steps in [0, 1), got {args.warmup}.")
    if (args.eval_every or args.patience != PATIENCE) and not args.val_pairs:
        raise UserError("--eval-every and --patience are for early stopping: pass --val-pairs FILE, held-out pairs "
                        "to stop on (docs/metrics.md).")
    if args.eval_every < 0 or args.patience < 1:
        raise UserError(f"--eval-every must be 1 or more (0: --steps / {EVALUATIONS}) and --patience at least 1, "
                        f"got {args.eval_every} and {args.patience}.")
    if not (args.pairs or args.beir):
        raise UserError("the probe needs an evaluation set: pass --pairs FILE or --beir DIR (see docs/metrics.md).")
    is_encoder = os.path.exists(os.path.join(args.target, "config.json"))
    if not is_encoder and not complete_checkpoints(args.target):
        raise UserError(f"{args.target} is neither an encoder folder (no config.json) nor a run folder with complete "
                        f"checkpoints (no {os.path.join(args.target, 'checkpoints', 'step_*')}). Pass an export or "
                        f"a run's --output-dir.")
    prefix, eval_set = load_retrieval_set(args)
    train = load_training_pairs(args.train_pairs, query_field=args.query_field, passage_field=args.passage_field,
                                negative_field=args.negative_field)
    if len(train["anchor"]) < args.batch_size:
        raise UserError(f"{args.train_pairs} holds {len(train['anchor'])} pairs, fewer than one --batch-size "
                        f"{args.batch_size} batch; lower --batch-size or add pairs.")
    val_set = None
    if args.val_pairs:
        val_set = load_pairs(args.val_pairs, query_field=args.query_field, passage_field=args.passage_field)
    settings = ProbeSettings(setting=args.setting, steps=args.steps, batch_size=args.batch_size,
                             mini_batch_size=args.mini_batch_size, learning_rate=args.lr, warmup=args.warmup,
                             max_length=args.max_length, seed=args.seed,
                             train_pairs=os.path.abspath(args.train_pairs), train_rows=len(train["anchor"]),
                             eval_source=os.path.abspath(eval_set.source), eval_queries=len(eval_set.query_ids),
                             **validation_settings(args, val_set))
    say(f"evaluation set: {eval_set.describe()}; fine-tune: {len(train['anchor'])} pairs, {args.steps} steps of "
        f"{args.batch_size}, setting {args.setting}" + (f"; early stopping on {val_set.describe()} every "
        f"{settings.eval_every} steps, patience {settings.patience}" if val_set is not None else ""))
    if is_encoder:
        entry = probe_encoder(args.target, train, eval_set, prefix, settings, val_set)
        print(summary(entry, prefix))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            results = {"settings": asdict(settings), "encoder": os.path.abspath(args.target), **entry}
            write_json_atomic(results_path(out, settings), results)
            print(f"wrote {results_path(out, settings)}")
        return 0
    out = Path(args.out) if args.out else Path(args.target) / "probe"
    results = probe_run(args.target, out, train, eval_set, prefix, settings, val_set)
    path = results_path(out, settings)
    print(f"{len(results['checkpoints'])} checkpoints probed: {path} and {path.with_suffix('.png').name}")
    return 0


def validation_settings(args, val_set) -> dict:
    """The early-stopping fields of :class:`ProbeSettings` ({} for a fixed-length probe)."""
    if val_set is None:
        return {}
    return {"val_pairs": os.path.abspath(args.val_pairs), "val_queries": len(val_set.query_ids),
            "eval_every": args.eval_every or max(1, args.steps // EVALUATIONS), "patience": args.patience}

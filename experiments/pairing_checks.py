"""Checks that one seed's runs really start alike, so that their paired differences measure the objective only.

The seed fixes the encoder's initialisation (with --model: whatever the folder lacks, e.g. the MLM head), the
data order and the encoder masks. Three witnesses, each empty/identical when that holds: the step-0
evaluations, the step-1 encoder loss (computed before any update) and a digest of the MLM head as the
trainer builds it.
"""

from __future__ import annotations

from pathlib import Path

from experiments.metric_keys import EVAL_METRICS
from experiments.runs import read_records


def init_mismatches(results: dict[str, list[dict]], tol: float = 1e-6) -> list[str]:
    """Same seed => same encoder init => same step-0 evaluation for every objective. Returns a line
    per (seed index, metric) where they disagree by more than tol (empty = the inits matched)."""
    problems = []
    objectives = list(results)
    for i in range(min(len(runs) for runs in results.values())):
        for k in EVAL_METRICS:
            values = [results[o][i].get(f"init/{k}") for o in objectives]
            problems += _disagreement(f"seed #{i}: {k} at step 0", objectives, values, tol)
    return problems


def _disagreement(what: str, objectives: list[str], values: list, tol: float) -> list[str]:
    """[] when the objectives' values agree within tol (or one is missing), else one line naming them."""
    if None in values or max(values) - min(values) <= tol:
        return []
    return [f"{what} differs across objectives: " + ", ".join(f"{o}={v:.6f}" for o, v in zip(objectives, values))]


def first_step_loss_mismatches(run_dirs: dict[str, list[Path]], tol: float = 1e-5) -> list[str]:
    """With --log-interval 1, the first training record's encoder loss is computed before any update,
    from the same init, batch and encoder masks: it must agree across objectives for each seed (it
    would not if the MLM head were initialised differently)."""
    problems = []
    objectives = list(run_dirs)
    for i in range(min(len(v) for v in run_dirs.values())):
        values = []
        for o in objectives:
            train = [r for r in read_records(run_dirs[o][i]) if r.get("kind") == "train"]
            values.append(train[0]["encoder_loss"] if train and train[0]["step"] == 1 else None)
        problems += _disagreement(f"seed #{i}: step-1 encoder loss", objectives, values, tol)
    return problems


def mlm_head_digests(model_path: str, objectives: list[str], seeds: list[int]) -> dict[int, dict[str, str]]:
    """{seed: {objective: digest of the MLM head (cls.predictions.*) as the trainer builds it}}: the
    trainer's build_model from the --model folder; a missing head is initialised from the seed, and
    must come out the same whatever else (a decoder, a bag-of-words head) the objective builds."""
    import hashlib

    from retromae_ds.config import TrainConfig
    from retromae_ds.engine.build import build_model, load_tokenizer

    digests: dict[int, dict[str, str]] = {}
    for seed in seeds:
        for objective in objectives:
            cfg = TrainConfig(objective=objective, seed=seed, model=model_path)  # the trainer's defaults
            model = build_model(cfg, load_tokenizer(cfg))
            h = hashlib.sha256()
            for name, tensor in sorted(model.lm.state_dict().items()):
                if name.startswith("cls.predictions."):
                    h.update(name.encode())
                    h.update(tensor.detach().float().contiguous().numpy().tobytes())
            digests.setdefault(seed, {})[objective] = h.hexdigest()[:16]
    return digests


def head_mismatches(digests: dict[int, dict[str, str]]) -> list[str]:
    """A line per seed whose objectives got different MLM heads (empty = identical)."""
    return [f"seed {s}: MLM head differs across objectives: {d}"
            for s, d in digests.items() if len(set(d.values())) > 1]

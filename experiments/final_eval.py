"""The final evaluation on one query set for every run: per-item results, kept in final_eval.npz.

The trainer's own evaluations draw their held-out spans from each run's seed, so they cannot be paired item
by item. After training, every run's final encoder (and, with --model, the starting encoder: init_eval.npz)
is scored once more on the same items (--eval-seed): per-query ranks by [CLS] and by mean pooling, the Lee
cosine matrices and per-document nDCG@10. The intervals (paired_statistics.py) resample these items. The
files carry a stamp of the evaluation settings: a stale or older file is evaluated again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def heldout_for(data: str, heldout_docs: int) -> list:
    from retromae_ds.data.heldout import heldout_blocks
    from retromae_ds.data.indexed import IndexedDataset

    return heldout_blocks(IndexedDataset(data), heldout_docs)[1]


def evaluate_items(encoder, tokenizer, blocks: list, *, eval_seed: int, max_length: int) -> dict:
    """Per-item evaluation of one encoder: held-out ranks, Lee cosines, per-document nDCG@10, and the
    aggregate metrics. Each held-out query and target, and each Lee document, is embedded once."""
    import numpy as np

    from retromae_ds.evaluate import graded_ndcg_per_query, heldout_retrieval, lee_cosines, lee_metrics

    t0 = time.monotonic()
    cos, human = lee_cosines(encoder, tokenizer, max_length=max_length)
    t_lee = time.monotonic() - t0
    ret = heldout_retrieval(encoder, blocks, tokenizer.cls_token_id, tokenizer.sep_token_id,
                            tokenizer.pad_token_id, seed=eval_seed, max_length=max_length, per_query=True)
    t_all = time.monotonic() - t0
    metrics = {**lee_metrics(cos, human), **{k: v for k, v in ret.items() if not k.startswith("heldout/ranks")}}
    return {"ranks": np.asarray(ret["heldout/ranks"], dtype=np.int64),
            "ranks_mean": np.asarray(ret["heldout/ranks_mean"], dtype=np.int64), "lee_cls": cos["cls"],
            "lee_mean": cos["mean"], "lee_human": human, "ndcg10_cls": graded_ndcg_per_query(cos["cls"], human),
            "metrics": metrics, "seconds": {"lee": t_lee, "heldout": t_all - t_lee, "total": t_all}}


def save_items(path: Path, items: dict) -> None:
    import numpy as np

    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, ranks=items["ranks"], ranks_mean=items["ranks_mean"], lee_cls=items["lee_cls"],
             lee_mean=items["lee_mean"], lee_human=items["lee_human"], ndcg10_cls=items["ndcg10_cls"],
             meta=json.dumps({"metrics": items["metrics"], "seconds": items["seconds"]}))
    tmp.replace(path)


def load_items(path: Path) -> dict:
    """What save_items wrote; a file from before mean-pooling retrieval has no "ranks_mean" (callers
    then evaluate again)."""
    import numpy as np

    with np.load(path) as z:
        items = {k: z[k] for k in ("ranks", "ranks_mean", "lee_cls", "lee_mean", "lee_human", "ndcg10_cls")
                 if k in z}
        items.update(json.loads(str(z["meta"])))
    return items


def eval_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def final_items(run_dir: Path, blocks: list, args) -> dict:
    """final_eval.npz of a run (computed from its last checkpoint when missing or stale)."""
    path = run_dir / "final_eval.npz"
    stamp = {"eval_seed": args.eval_seed, "heldout_docs": args.heldout_docs, "max_length": args.eval_max_length}
    if path.exists():
        items = load_items(path)
        if items.get("metrics", {}).get("stamp") == stamp and "ranks_mean" in items:
            return items
    from retromae_ds.engine.export import load_checkpoint_model

    model, tokenizer, _, _ = load_checkpoint_model(run_dir)
    items = evaluate_items(model.encoder.to(eval_device()), tokenizer, blocks, eval_seed=args.eval_seed,
                           max_length=args.eval_max_length)
    items["metrics"]["stamp"] = stamp
    save_items(path, items)
    return items


def init_items(model_path: str, blocks: list, args, out_root: Path) -> dict:
    """Per-item evaluation of the starting encoder of --model runs (the same for every seed)."""
    path = out_root / "init_eval.npz"
    stamp = {"eval_seed": args.eval_seed, "heldout_docs": args.heldout_docs, "max_length": args.eval_max_length,
             "model": str(Path(model_path).resolve())}
    if path.exists():
        items = load_items(path)
        if items.get("metrics", {}).get("stamp") == stamp and "ranks_mean" in items:
            return items
    from retromae_ds.evaluate import load_encoder

    encoder, tokenizer = load_encoder(model_path)
    items = evaluate_items(encoder.to(eval_device()), tokenizer, blocks, eval_seed=args.eval_seed,
                           max_length=args.eval_max_length)
    items["metrics"]["stamp"] = stamp
    save_items(path, items)
    return items

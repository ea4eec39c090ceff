"""Zero-shot quality of the [CLS] sentence embedding: Lee document similarity and held-out retrieval.

``retromae-ds eval MODEL_DIR [--data PREFIX]`` scores a Hugging Face encoder folder; the trainer calls
the same functions every ``--eval-interval`` steps.

Lee document similarity (gensim's ``lee.cor`` + ``similarities0-1.txt``): 50 news documents whose 1,225
pairs were scored by humans. We report Pearson and Spearman between human scores and the cosine of
the [CLS] embeddings (and of mean-pooled embeddings), and graded nDCG@10 with each document as a
query. Reference numbers: all-MiniLM-L6-v2 [CLS] Pearson 0.609 / Spearman 0.474, random init
0.124 / 0.091. The set is small: compare several seeds before claiming a gain.

Held-out retrieval on the user's own data: the last documents of the first dataset are excluded from
training. From each held-out passage (block) a contiguous span is cut out as the query; the target is
the rest of the passage. Every query searches all held-out targets by [CLS] cosine; we report MRR@10
and Recall@1/10/100. This is the RetroMAE objective's own promise (the [CLS] vector must carry the
passage's content), measured on text the model never trained on. The same queries ranked by the cosine
of mean-pooled embeddings (free: one forward gives both) are reported as ``heldout/mrr10_mean`` etc.

[CLS] gain (``cls_gain``, trainer only: it needs the decoder): on held-out blocks, the decoder's
reconstruction loss with each passage's own [CLS] vector against the loss with another passage's, in
nats per token; what the sentence vector carries that the visible tokens do not. See :func:`cls_gain`.

Distributed use: under ZeRO-3 the parameters are gathered collectively during every forward, so all
ranks must run exactly the same forwards. Everything here is deterministic (fixed order, fixed batch
composition, seeded spans), so the trainer simply runs it on every rank and rank 0 logs the result.
Cost is one encoder forward per embedded token: Lee (50 documents, ~5k tokens) took ~4.5 s for MiniLM
on a 2-core CPU; held-out retrieval embeds every passage twice (query + rest), so 300 passages of
254 ids took ~100 s there (a shared, busy machine). On CPU keep --eval-heldout-docs small or blocks
short; on a GPU both are cheap.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import numpy as np

from retromae_ds.config import DEFAULT_SEED, EVAL_HELDOUT_DOCS, EVAL_MAX_LENGTH
from retromae_ds.data.heldout import heldout_blocks, heldout_queries
from retromae_ds.errors import UserError, make_folder

LEE_DOCS_FILE = "lee.cor"
LEE_SCORES_FILE = "similarities0-1.txt"
LEE_NUM_DOCS = 50
RETRIEVAL_SIMILARITIES = ("cos", "dot")  # --similarity of `eval --pairs/--beir`


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------

def _model_device(encoder):
    import torch

    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


def embed_ids(encoder, id_lists: Sequence[np.ndarray], cls_id: int, sep_id: int, pad_id: int, *,
              batch_size: int = 32, max_length: int = 512, device=None,
              normalize: bool = True) -> dict[str, np.ndarray]:
    """L2-normalised "cls" (position 0) and "mean" (all non-pad tokens) embeddings, float32 [n, hidden]
    (``normalize=False``: as the encoder gives them, for dot-product similarity).

    ``id_lists`` hold ids WITHOUT specials; each becomes [CLS] ids[:max_length-2] [SEP]. ``encoder`` is
    a Hugging Face base model (output ``.last_hidden_state``). Sequences are batched in order of
    length (stable sort, so the batches are the same on every rank) to waste little on padding; the
    rows come back in input order. The encoder runs in eval mode under no_grad and gets its previous
    train/eval mode back afterwards.
    """
    import torch

    if max_length < 3:
        raise ValueError(f"max_length must leave room for [CLS], one id and [SEP]; got {max_length}")
    device = torch.device(device) if device is not None else _model_device(encoder)
    rows = [np.concatenate([[cls_id], np.asarray(ids, dtype=np.int64)[: max_length - 2], [sep_id]])
            for ids in id_lists]
    order = np.argsort([len(r) for r in rows], kind="stable")
    cls_out: list = [None] * len(rows)
    mean_out: list = [None] * len(rows)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chosen = order[start:start + batch_size]
                width = max(len(rows[i]) for i in chosen)
                input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chosen), width), dtype=torch.long)
                for b, i in enumerate(chosen):
                    input_ids[b, : len(rows[i])] = torch.from_numpy(rows[i])
                    mask[b, : len(rows[i])] = 1
                out = encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device))
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hidden = hidden.float()
                m = mask.to(hidden.device).unsqueeze(-1).float()
                mean = (hidden * m).sum(1) / m.sum(1)
                cls = hidden[:, 0]
                for b, i in enumerate(chosen):
                    cls_out[i] = cls[b].cpu().numpy()
                    mean_out[i] = mean[b].cpu().numpy()
    finally:
        encoder.train(was_training)
    finish = _l2_normalise if normalize else (lambda x: np.asarray(x, dtype=np.float32))
    return {"cls": finish(np.stack(cls_out)) if rows else np.zeros((0, 0), np.float32),
            "mean": finish(np.stack(mean_out)) if rows else np.zeros((0, 0), np.float32)}


def embed_texts(encoder, tokenizer, texts: Sequence[str], **kw) -> dict[str, np.ndarray]:
    """:func:`embed_ids` for raw strings, tokenized without specials by ``tokenizer``."""
    # Truncating here as embed_ids would (room for [CLS]/[SEP]) also silences the tokenizer's
    # "sequence longer than the model's maximum" warning for long texts.
    room = kw.get("max_length", 512) - 2
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    return embed_ids(encoder, [np.asarray(x, dtype=np.int64) for x in ids], tokenizer.cls_token_id,
                     tokenizer.sep_token_id, tokenizer.pad_token_id, **kw)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------------------------
# Metrics (numpy only: scipy is not a dependency)
# --------------------------------------------------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span.

    Vectorised (no Python loop over tie groups) because the ablation's bootstrap ranks thousands of
    resampled pair sets.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based rank of each group of equal values
    return ((ends - counts + 1 + ends) / 2.0)[inverse.reshape(-1)]


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson of the average ranks (the usual definition, correct with ties)."""
    return pearson(average_ranks(x), average_ranks(y))


def graded_ndcg_per_query(scores: np.ndarray, gains: np.ndarray, k: int = 10) -> np.ndarray:
    """nDCG@k of each item as a query over all OTHER items (diagonal excluded); NaN where IDCG is 0.

    ``scores[i, j]`` ranks the candidates for query i (ties broken by index, stably);
    ``gains[i, j]`` is their graded relevance, here the human similarity score in [0, 1], used
    linearly: DCG = sum gain / log2(rank + 1). IDCG ranks the same candidates by gain. Per query so
    that the ablation can bootstrap over queries.
    """
    scores = np.asarray(scores, dtype=np.float64)
    gains = np.asarray(gains, dtype=np.float64)
    n = len(scores)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = np.full(n, np.nan)
    for i in range(n):
        others = np.array([j for j in range(n) if j != i], dtype=np.int64)
        s, g = scores[i, others], gains[i, others]
        top = np.argsort(-s, kind="stable")[:k]
        ideal = np.sort(g)[::-1][:k]
        idcg = float((ideal * discounts[: len(ideal)]).sum())
        if idcg > 0:
            values[i] = float((g[top] * discounts[: len(top)]).sum()) / idcg
    return values


def graded_ndcg_at_k(scores: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """Mean of :func:`graded_ndcg_per_query` over the queries with a positive IDCG. Note that Lee
    scores are rarely below 0.2, so even a random ranking gets a sizeable nDCG; compare against the
    random-init figure, not against 0.
    """
    values = graded_ndcg_per_query(scores, gains, k)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else 0.0


# --------------------------------------------------------------------------------------------
# Lee document similarity
# --------------------------------------------------------------------------------------------

def load_lee() -> tuple[list[str], np.ndarray]:
    """The 50 Lee documents and the symmetric 50x50 matrix of human scores (diagonal 1)."""
    try:
        from retromae_ds.data.demo_corpus import gensim_test_data_dir
        folder = gensim_test_data_dir()
    except UserError:
        raise UserError("the Lee similarity evaluation reads its documents from the gensim package, which is "
                        "not installed. Install it with `pip install gensim` (or "
                        "`pip install retromae-ds[demo]`).") from None
    docs_path, scores_path = os.path.join(folder, LEE_DOCS_FILE), os.path.join(folder, LEE_SCORES_FILE)
    for path in (docs_path, scores_path):
        if not os.path.exists(path):
            raise UserError(f"{path} is missing from the installed gensim; the Lee evaluation needs gensim's "
                            f"test data. Reinstall it with `pip install --force-reinstall gensim`.")
    with open(docs_path, encoding="latin-1") as f:
        docs = [line.strip() for line in f.read().splitlines() if line.strip()]
    upper = np.loadtxt(scores_path, dtype=np.float64)
    if len(docs) != LEE_NUM_DOCS or upper.shape != (LEE_NUM_DOCS, LEE_NUM_DOCS):
        raise UserError(f"{docs_path} / {scores_path}: expected {LEE_NUM_DOCS} documents and a "
                        f"{LEE_NUM_DOCS}x{LEE_NUM_DOCS} score matrix, found {len(docs)} and {upper.shape}. "
                        f"Reinstall gensim.")
    human = np.triu(upper, 1)
    human = human + human.T
    np.fill_diagonal(human, 1.0)
    return docs, human


_LEE_IDS_CACHE: dict = {}


def lee_ids(tokenizer, max_length: int) -> list[np.ndarray]:
    """The Lee documents as ids without specials, truncated for max_length; tokenized once per
    (tokenizer, max_length) and process, since the trainer evaluates the same 50 texts many times."""
    room = max_length - 2
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), room)
    if key not in _LEE_IDS_CACHE:
        docs, _ = load_lee()
        ids = tokenizer(docs, add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        _LEE_IDS_CACHE[key] = [np.asarray(x, dtype=np.int64) for x in ids]
    return _LEE_IDS_CACHE[key]


def lee_cosines(encoder, tokenizer, *, max_length: int = 512, batch_size: int = 32,
                device=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"cls": 50x50 cosine, "mean": 50x50 cosine}, 50x50 human scores): the raw material of
    :func:`lee_similarity`, kept whole so that the ablation can bootstrap over documents."""
    _, human = load_lee()
    if max_length < 3:
        raise ValueError(f"max_length must leave room for [CLS], one id and [SEP]; got {max_length}")
    emb = embed_ids(encoder, lee_ids(tokenizer, max_length), tokenizer.cls_token_id, tokenizer.sep_token_id,
                    tokenizer.pad_token_id, max_length=max_length, batch_size=batch_size, device=device)
    return {pooling: emb[pooling] @ emb[pooling].T for pooling in ("cls", "mean")}, human


def lee_metrics(cosines: dict[str, np.ndarray], human: np.ndarray) -> dict[str, float]:
    """Pearson/Spearman over the upper-triangle pairs and mean nDCG@10, per pooling."""
    iu = np.triu_indices(len(human), 1)
    results = {}
    for pooling in ("cls", "mean"):
        cosine = cosines[pooling]
        results[f"lee/pearson_{pooling}"] = pearson(cosine[iu], human[iu])
        results[f"lee/spearman_{pooling}"] = spearman(cosine[iu], human[iu])
        results[f"lee/ndcg10_{pooling}"] = graded_ndcg_at_k(cosine, human, 10)
    return {k: results[k] for k in ("lee/pearson_cls", "lee/spearman_cls", "lee/pearson_mean",
                                     "lee/spearman_mean", "lee/ndcg10_cls", "lee/ndcg10_mean")}


def lee_similarity(encoder, tokenizer, *, max_length: int = 512, batch_size: int = 32,
                   device=None) -> dict[str, float]:
    """Pearson/Spearman of embedding cosine vs human scores over the 1,225 Lee pairs, and nDCG@10.

    Keys: ``lee/{pearson,spearman,ndcg10}_{cls,mean}``. Lee documents are 53-154 MiniLM tokens, so
    any max_length >= 160 scores the full text.
    """
    cosines, human = lee_cosines(encoder, tokenizer, max_length=max_length, batch_size=batch_size, device=device)
    return lee_metrics(cosines, human)


# --------------------------------------------------------------------------------------------
# Held-out retrieval
# --------------------------------------------------------------------------------------------

def retrieval_ranks(query_emb: np.ndarray, target_emb: np.ndarray) -> np.ndarray:
    """1-based rank of target i for query i; ties count against the query (pessimistic)."""
    scores = query_emb @ target_emb.T
    correct = np.diag(scores)[:, None]
    return (scores >= correct).sum(axis=1)


RECALL_KS = (1, 10, 100)


def rank_metrics(ranks: np.ndarray, suffix: str = "", candidates: int | None = None) -> dict[str, float]:
    """MRR@10 and Recall@1/10/100 of 1-based ranks (empty: all 0); ``suffix`` ends every key
    (``"_mean"``: the mean-pooling keys, e.g. ``heldout/mrr10_mean``). With ``candidates`` (how many
    targets each query ranks), a Recall@k with k >= candidates is left out: every target is within the top
    k, so it would be 1 by construction (50 held-out documents give ~60 candidates: no Recall@100)."""
    ranks = np.asarray(ranks)
    ks = [k for k in RECALL_KS if candidates is None or k < candidates]
    if len(ranks) == 0:
        return {f"heldout/{k}{suffix}": 0.0 for k in ["mrr10"] + [f"recall{k}" for k in ks]}
    result = {f"heldout/mrr10{suffix}": float(np.where(ranks <= 10, 1.0 / ranks, 0.0).mean())}
    for k in ks:
        result[f"heldout/recall{k}{suffix}"] = float((ranks <= k).mean())
    return result


def heldout_retrieval(encoder, blocks: Sequence[np.ndarray], cls_id: int, sep_id: int, pad_id: int, *,
                      seed: int = 0, query_fraction: float = 0.25, min_len: int = 16,
                      max_length: int = 512, batch_size: int = 32, device=None,
                      per_query: bool = False) -> dict:
    """MRR@10 and Recall@1/10/100 of span -> rest-of-passage retrieval by [CLS] cosine, and the same
    by mean-pooled cosine (keys ending in ``_mean``, e.g. ``heldout/mrr10_mean``). A Recall@k whose k is
    not below the number of targets (``heldout/num_queries``) is left out (see :func:`rank_metrics`).

    Queries and targets come from :func:`heldout_queries` (passages shorter than ``min_len`` are
    skipped); each query and each target is embedded exactly once (one forward gives both poolings), and
    each query ranks all targets. The same seed gives the same queries, so numbers are comparable across
    checkpoints. With ``per_query`` the result also holds "heldout/ranks" and "heldout/ranks_mean" (lists
    of 1-based ranks, in passage order: [CLS], mean pooling), which the trainer's logger leaves out of
    metrics.jsonl.
    """
    queries, targets = heldout_queries(blocks, seed=seed, query_fraction=query_fraction, min_len=min_len)
    if not queries:
        result = {**rank_metrics([]), **rank_metrics([], "_mean"), "heldout/num_queries": 0}
        return {**result, "heldout/ranks": [], "heldout/ranks_mean": []} if per_query else result
    kw = dict(batch_size=batch_size, max_length=max_length, device=device)
    q_emb = embed_ids(encoder, queries, cls_id, sep_id, pad_id, **kw)
    t_emb = embed_ids(encoder, targets, cls_id, sep_id, pad_id, **kw)
    ranks = retrieval_ranks(q_emb["cls"], t_emb["cls"])
    ranks_mean = retrieval_ranks(q_emb["mean"], t_emb["mean"])
    candidates = len(targets)  # every query ranks all targets: a Recall@k with k >= this would be 1
    result = {**rank_metrics(ranks, candidates=candidates), **rank_metrics(ranks_mean, "_mean", candidates),
              "heldout/num_queries": len(queries)}
    if per_query:
        result["heldout/ranks"] = [int(r) for r in ranks]
        result["heldout/ranks_mean"] = [int(r) for r in ranks_mean]
    return result


# --------------------------------------------------------------------------------------------
# [CLS] gain: how much the decoder relies on the sentence vector
# --------------------------------------------------------------------------------------------

CLS_GAIN_BLOCKS = 64  # held-out blocks scored per evaluation


def _cls_gain_generator(seed: int, device):
    """The mask generator's random stream for one evaluation: a hash of the run seed only, so every
    evaluation (and every rank) draws the same masks for the same blocks."""
    import hashlib

    import torch

    digest = hashlib.blake2b(f"retromae-ds/cls-gain/{int(seed)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return generator


def cls_gain(model, blocks: Sequence[np.ndarray], masker, *, seed: int = 0, batch_size: int = 32,
             max_tokens: int | None = None, max_blocks: int = CLS_GAIN_BLOCKS) -> tuple[dict, str | None]:
    """How much the RetroMAE decoder uses the [CLS] vector: `({"cls_gain": nats per token}, None)`, or
    `({}, why not)` when it does not apply (objective "mlm": no decoder; fewer than 2 usable blocks).

    Up to ``max_blocks`` of ``blocks`` (ids without specials, cut to ``max_tokens``), picked and ordered
    by ``numpy.random.default_rng(seed)`` so that neighbours rarely come from one document, are masked by
    ``masker`` (a MaskGenerator; its device is where everything runs) with a generator seeded from
    ``seed`` alone, in batches of ``batch_size`` (at least 2; a last batch of one joins the one before).
    For each batch the model's ``decoder_loss`` scores the decoder's tokens once with every sample's own
    [CLS] vector and once with the next sample's (sample i decodes from sample i + 1's, rolled within
    the batch). cls_gain = (summed loss with the neighbour's [CLS] - with its own) / decoder tokens, in
    nats per token: what the sentence vector tells the decoder about its own passage. Near 0 (or
    negative) means the bottleneck is not working: the decoder reconstructs from the visible tokens alone.

    Deterministic (same weights, same number): fixed blocks, batches and masks, model in eval mode (no
    dropout) under no_grad; every submodule gets its previous mode back. All ranks run the same
    forwards, as ZeRO-3 requires. DupMAE models are scored on the same RetroMAE decoder loss.
    """
    import torch

    from retromae_ds.data.masking import collate_blocks

    if getattr(getattr(model, "config", None), "objective", None) == "mlm":
        return {}, "objective mlm has no decoder, so eval/cls_gain does not apply (not logged)"
    usable = [i for i, ids in enumerate(blocks) if len(ids) > 0]
    if len(usable) < 2:
        return {}, (f"eval/cls_gain needs at least 2 held-out blocks to swap [CLS] vectors between; there are "
                    f"{len(usable)} (not logged)")
    chosen = np.random.default_rng(seed).permutation(np.asarray(usable))[:max_blocks]
    size = max(2, int(batch_size))
    batches = [chosen[start:start + size] for start in range(0, len(chosen), size)]
    if len(batches[-1]) == 1:
        batches[-2:] = [np.concatenate(batches[-2:])]
    device = masker.continuation.device
    generator = _cls_gain_generator(seed, device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for batch in batches:
                ids = [np.asarray(blocks[i], dtype=np.int64)[:max_tokens] for i in batch]
                tokens, lengths = collate_blocks(ids, masker.pad_id, max_tokens=max_tokens)
                inputs = masker(tokens.to(device), lengths.to(device), generator)
                losses, scored = model.decoder_loss(**inputs, roll_cls=(0, 1))
                sums += losses.to(torch.float64)
                count += scored
    finally:
        for module, training in modes:
            module.training = training
    own, rolled = (sums / count.clamp(min=1)).tolist()
    # the own-[CLS] loss is also the held-out reconstruction loss per token: comparable across runs whose
    # training losses are averaged differently (e.g. --group-by-length's token weighting)
    return {"cls_gain": rolled - own, "heldout/decoder_loss": own}, None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="Hugging Face encoder folder (config + weights + tokenizer), e.g. an export")
    parser.add_argument("--data", metavar="PREFIX", default=None,
                        help="prepared dataset; its last --heldout-docs documents are used for retrieval")
    parser.add_argument("--heldout-docs", type=int, default=None, metavar="N",
                        help=f"documents at the end of --data to retrieve among (default: what the run that wrote "
                             f"MODEL_DIR held out, else {EVAL_HELDOUT_DOCS}, the trainer's --eval-heldout-docs)")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help=f"tokens per input incl. [CLS]/[SEP], at most the model's positions (default: the run's "
                             f"--eval-max-length, else {EVAL_MAX_LENGTH}, the trainer's default)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="texts per forward pass (default 32, as in training)")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the held-out query spans (default: the run's --seed, else {DEFAULT_SEED}, "
                             f"the trainer's default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-lee", action="store_true", help="skip the Lee similarity evaluation")
    parser.add_argument("--json", metavar="OUT.json", default=None, help="also write the results as JSON")
    group = add_set_arguments(parser)
    group.add_argument("--similarity", choices=tuple(RETRIEVAL_SIMILARITIES), default=None,
                       help="cos (default) or dot (the product of unnormalised vectors, as RetroMAE's bi-encoder)")
    group.add_argument("--no-bm25", action="store_true", help="leave out the BM25 reference line")
    group.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                       help="resamples of the queries for the 95%% intervals (default 1000; 0 = no intervals)")


def add_set_arguments(parser: argparse.ArgumentParser):
    """The flags that name a retrieval set, shared by `eval` and `probe`; returns their argument group."""
    group = parser.add_argument_group("retrieval on your own data (docs/metrics.md)")
    group.add_argument("--pairs", metavar="FILE", default=None,
                       help="query-passage pairs (.jsonl, .tsv, .csv or .parquet): each query's own passage is its "
                            "one positive, every passage in the file is a candidate")
    group.add_argument("--beir", metavar="DIR", default=None,
                       help="a BEIR folder: corpus.jsonl, queries.jsonl and qrels/SPLIT.tsv (graded relevance)")
    group.add_argument("--beir-split", default="test", metavar="SPLIT", help="qrels file of --beir (default test)")
    group.add_argument("--query-field", default="query", metavar="NAME", help="query field of --pairs (default query)")
    group.add_argument("--passage-field", default="passage", metavar="NAME",
                       help="passage field of --pairs (default passage)")
    return group


def load_retrieval_set(args):
    """The --pairs or --beir set of `args` as (key prefix, RetrievalSet), or (None, None)."""
    from retromae_ds.data.retrieval_sets import load_beir, load_pairs

    if args.pairs and args.beir:
        raise UserError("pass --pairs or --beir, not both: one retrieval set per evaluation.")
    if args.pairs:
        return "pairs", load_pairs(args.pairs, query_field=args.query_field, passage_field=args.passage_field)
    if args.beir:
        return "beir", load_beir(args.beir, split=args.beir_split)
    return None, None


# The export records the settings of its run's evaluation here (retromae_ds/engine/export.py).
RUN_RECORD = os.path.join("retromae", "exported_from.json")


def run_evaluation_settings(model_dir: str) -> dict:
    """The evaluation settings the export in `model_dir` recorded from its run ({} when it has none):
    max_length, heldout_docs, seed and the run's first --data prefix."""
    try:
        with open(os.path.join(model_dir, RUN_RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    settings = record.get("evaluation") if isinstance(record, dict) else None
    return settings if isinstance(settings, dict) else {}


def evaluation_length(requested: int, encoder) -> int:
    """Texts are cut to what the position table holds, as the trainer cuts them (a 128-position model
    cannot embed 256 tokens); rotary models take `requested`."""
    from retromae_ds.model.positions import token_positions

    try:
        positions = token_positions(encoder)
    except AttributeError:
        positions = None
    return min(requested, positions or requested)


def load_encoder(model_dir: str):
    """AutoModel + AutoTokenizer from a local folder, with a UserError when that fails."""
    from transformers import AutoModel, AutoTokenizer

    if not os.path.isdir(model_dir):
        raise UserError(f"MODEL_DIR {model_dir} is not a folder. Pass a Hugging Face encoder folder, e.g. the "
                        f"output of `retromae-ds export`.")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise UserError(f"{model_dir} has no config.json, so it is not a Hugging Face model folder. Pass the "
                        f"folder written by `retromae-ds export` (or save_pretrained).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        encoder = AutoModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"could not load the encoder or tokenizer from {model_dir}: {err}. The folder needs "
                        f"config.json, model weights and tokenizer files; re-export it with "
                        f"`retromae-ds export`.") from None
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer in {model_dir} has no [CLS]/[SEP]/[PAD] token (cls={tokenizer.cls_token_id}, "
                        f"sep={tokenizer.sep_token_id}, pad={tokenizer.pad_token_id}); evaluation needs all three.")
    return encoder, tokenizer


def check_json_target(path) -> None:
    """Make --json's folder and check it takes a file, before a long evaluation rather than after it."""
    folder = os.path.dirname(os.path.abspath(path))
    make_folder(folder, f"--json {path}")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        what = "is a folder" if os.path.isdir(path) else f"its folder {folder} is not writable"
        raise UserError(f"--json {path}: {what}; pick a writable file path.")


def write_json_atomic(path, payload: dict) -> None:
    """Write JSON through PATH.partial and a rename, so a reader never sees half a file; makes the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(args) -> int:
    import torch

    from retromae_ds.data.indexed import IndexedDataset, check_tokenizer_matches

    run = run_evaluation_settings(args.model_dir)
    recorded = {k: run[k] for k in ("max_length", "heldout_docs", "seed")
                if isinstance(run.get(k), int) and getattr(args, k) is None}
    max_length = args.max_length if args.max_length is not None else recorded.get("max_length", EVAL_MAX_LENGTH)
    heldout_docs = args.heldout_docs if args.heldout_docs is not None else recorded.get("heldout_docs",
                                                                                         EVAL_HELDOUT_DOCS)
    seed = args.seed if args.seed is not None else recorded.get("seed", DEFAULT_SEED)
    if max_length < 3 or args.batch_size < 1:
        raise UserError(f"--max-length must be >= 3 and --batch-size >= 1 (got {max_length}, {args.batch_size}).")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0 (resamples; 0 = no intervals), got {args.bootstrap}.")
    prefix, retrieval_set = load_retrieval_set(args)  # bad data fails before the model loads
    if args.json:
        check_json_target(args.json)
    encoder, tokenizer = load_encoder(args.model_dir)
    length = evaluation_length(max_length, encoder)
    if recorded:
        used = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in recorded.items())
        print(f"settings of the run's own evaluation, recorded in {os.path.join(args.model_dir, RUN_RECORD)}: "
              f"{used} (flags override them)")
    if length < max_length and args.max_length is not None:
        print(f"texts cut to {length} tokens, the model's positions (--max-length {max_length} asked for more)")
    if not args.data and run.get("data"):
        print(f"held-out retrieval needs --data: the run held out the last {run.get('heldout_docs')} documents "
              f"of {run['data']}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder.to(device)
    results: dict = {}
    if not args.no_lee:
        results.update(lee_similarity(encoder, tokenizer, max_length=length, batch_size=args.batch_size,
                                      device=device))
    if args.data:
        dataset = IndexedDataset(args.data)
        check_tokenizer_matches(dataset.meta, tokenizer, dataset.prefix)
        _, blocks = heldout_blocks(dataset, heldout_docs)
        results.update(heldout_retrieval(encoder, blocks, tokenizer.cls_token_id, tokenizer.sep_token_id,
                                         tokenizer.pad_token_id, seed=seed, max_length=length,
                                         batch_size=args.batch_size, device=device))
    if results:
        width = max(len(k) for k in results)
        print(f"{'metric':<{width}}  value")
        for key, value in results.items():
            print(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    left_out = [f"recall{k}" for k in RECALL_KS if args.data and f"heldout/recall{k}" not in results]
    if left_out:
        print(f"({', '.join(left_out)} left out: each query ranks only {results.get('heldout/num_queries')} "
              f"candidates, so a Recall@k with k at least that is 1 by construction; a larger --heldout-docs "
              f"gives more candidates)")
    if retrieval_set is not None:
        results.update(_retrieval(args, prefix, retrieval_set, encoder, tokenizer, length, seed, device))
    if args.json:
        write_json_atomic(args.json, {"model_dir": os.path.abspath(args.model_dir), "data": args.data,
                                       "pairs": args.pairs, "beir": args.beir,
                                       "similarity": (args.similarity or "cos") if retrieval_set else None,
                                       "max_length": length, "heldout_docs": heldout_docs, "seed": seed,
                                       "metrics": results})
    return 0


def _retrieval(args, prefix, retrieval_set, encoder, tokenizer, length, seed, device) -> dict:
    """Score --pairs/--beir, print the table, the timing and the memory; the flat metrics."""
    from retromae_ds.retrieval.evaluation import format_table, memory_line, score_set

    similarity = args.similarity or "cos"
    print(f"\n{retrieval_set.describe()}: ranked by {similarity} similarity, texts cut to {length} tokens")
    scores = score_set(encoder, tokenizer, retrieval_set, prefix=prefix, max_length=length,
                       batch_size=args.batch_size, device=device, similarity=similarity, bm25=not args.no_bm25,
                       resamples=args.bootstrap, seed=seed, progress=True)
    for line in format_table(scores, prefix):
        print(line)
    if args.bootstrap:
        print(f"[lo, hi]: 95% bootstrap interval over queries ({args.bootstrap} resamples, seed {seed})")
    print(f"{scores.seconds:.1f} s; {memory_line(scores)}")
    return scores.metrics

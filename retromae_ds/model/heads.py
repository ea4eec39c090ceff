"""The MLM head and embedding module of any Hugging Face masked-LM model, and the losses on top.

Finding them generically: a `*ForMaskedLM` model holds its encoder as `model.base_model` and the
MLM head as the other child modules with parameters: one for BERT (`cls`) and RoBERTa/XLM-R
(`lm_head`), a chain of two for ModernBERT (`head`, then the projection `decoder`).
The head is always *called* (never its `.weight` read), so the same code works when DeepSpeed
ZeRO-3 partitions the parameters and gathers them around each module call.

Fast heads. Vocabulary logits cost B x L x V memory and matmul time, but a loss needs them only
where a label exists: the encoder's masked positions (~30%) and the decoder's labelled rows. The
fast path selects those hidden rows first, then projects. Its cross-entropy keeps only the logits
(bf16 under mixed precision) for backward and writes the gradient straight into one buffer of the
logits' dtype, doing the fp32 math a block of rows at a time (the stock `F.cross_entropy` on
upcast logits keeps an fp32 log-softmax and builds two full fp32 buffers in backward). With
`chunk_size`, rows are projected `chunk_size` at a time inside activation checkpoints, so at most
one chunk of logits exists at once (the head's forward is recomputed in backward): the option for
250k-token vocabularies such as XLM-R. Every path gives the naive loss (tests check 1e-5).

Static selection. Picking "the rows whose label is not -100" with a boolean index has a shape only
the device knows, so the host waits for it (a sync per head per micro-batch) and `torch.compile` sees a
new shape every time. Given a `capacity` known on the host (the masker's budget bounds the encoder's
masked positions; the decoder labels every real row), the rows are gathered through an index of that
fixed size instead: labelled rows first, in order, then filler rows whose target is -100, which the
cross-entropy counts as zero with zero gradient. Same loss, a fixed shape, no sync.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from retromae_ds.errors import UserError

IGNORE_INDEX = -100


def find_mlm_head(lm: nn.Module) -> tuple[str, ...]:
    """Names of the children of a `*ForMaskedLM` model that make its MLM head, in the order its own
    forward applies them to the encoder output; UserError when that is not a plain chain.

    BERT (`cls`) and RoBERTa/XLM-R (`lm_head`) have one head module. ModernBERT splits it in two:
    `head` (dense + activation + norm) then `decoder` (the tied vocabulary projection). With several
    parts the order is read off one tiny forward of the model (hooks record the call order) and the
    chain is checked to reproduce the model's logits, so a head that is not a simple chain is refused
    instead of silently trained wrong. ModernBERT's `sparse_prediction` (labelled rows only, before
    the head) is only taken when labels are passed, which the probe and RetroMAE never do: the fast
    heads select labelled rows themselves.
    """
    base = getattr(lm, "base_model", None)
    if base is None or base is lm:
        raise UserError(f"{type(lm).__name__} is not a Hugging Face *ForMaskedLM model (no separate base_model); "
                        f"load the encoder with AutoModelForMaskedLM (BERT, RoBERTa, XLM-R, ModernBERT, ...).")
    children = [name for name, child in lm.named_children() if child is not base]
    parts = [name for name in children if any(True for _ in getattr(lm, name).parameters())]
    output = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if len(parts) == 1:
        return (parts[0],)
    if len(parts) < 1 or not any(getattr(lm, name) is output for name in parts):
        raise UserError(f"{type(lm).__name__}: expected one masked-LM head module next to the encoder, found "
                        f"{parts or 'none'}. RetroMAE reuses that head for the decoder; supported are models "
                        f"shaped like BERT (`cls`), RoBERTa/XLM-R (`lm_head`) or ModernBERT (`head` + `decoder`).")
    return _head_call_order(lm, children, parts)  # parameter-free children (an activation) may be links too


def _head_call_order(lm: nn.Module, children: list[str], parts: list[str]) -> tuple[str, ...]:
    """Run the model once on a few tokens, record which head parts its forward calls (in order) and
    check that chaining them on the encoder output gives the model's logits."""
    weights = [p for p in lm.parameters()]
    if any(p.numel() == 0 or p.is_meta for p in weights):  # partitioned (ZeRO-3 init) or meta: cannot probe
        return tuple(parts)
    order, handles = [], []
    for name in children:
        handles.append(getattr(lm, name).register_forward_hook(lambda *_, name=name: order.append(name)))
    captured = {}

    def keep_hidden(module, args, out) -> None:  # returns None: a hook's return value would replace the output
        captured.setdefault("hidden", out[0])

    handles.append(lm.base_model.register_forward_hook(keep_hidden))
    was_training = lm.training
    device = weights[0].device
    special = [getattr(lm.config, key, None) for key in ("cls_token_id", "bos_token_id", "pad_token_id")]
    token = next((t for t in special if isinstance(t, int) and 0 <= t < lm.config.vocab_size), 0)
    ids = torch.full((1, 4), token, dtype=torch.long, device=device)
    try:
        lm.eval()
        with torch.no_grad():
            logits = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            for handle in handles:
                handle.remove()
            chained = captured["hidden"]
            try:
                for name in order:
                    chained = getattr(lm, name)(chained)
            except RuntimeError:  # parts that do not compose (e.g. two heads summed by the forward)
                chained = None
    finally:
        lm.train(was_training)
        for handle in handles:
            handle.remove()
    if chained is None or not set(parts) <= set(order) or chained.shape != logits.shape or \
            not torch.allclose(chained.float(), logits.float(), atol=1e-4, rtol=1e-3):
        raise UserError(f"{type(lm).__name__}: its masked-LM head parts {parts} are not applied as a simple chain "
                        f"to the encoder output (call order seen: {order}), so RetroMAE cannot reuse the head for "
                        f"its decoder.")
    return tuple(order)


class ChainedHead:
    """Calls the head parts one after the other (ModernBERT: `head` then `decoder`). A plain callable
    built on the fly, not a module: it adds no state-dict keys and nothing for DeepSpeed to track;
    each part is still its own module call, which is what ZeRO-3 gathers parameters around."""

    def __init__(self, parts: list[nn.Module]) -> None:
        self.parts = parts

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            hidden = part(hidden)
        return hidden


def find_embeddings(lm: nn.Module) -> nn.Module:
    """The encoder's embedding module; it must accept `input_ids=` and `inputs_embeds=`."""
    embeddings = getattr(lm.base_model, "embeddings", None)
    params = inspect.signature(embeddings.forward).parameters if isinstance(embeddings, nn.Module) else {}
    if "input_ids" not in params or "inputs_embeds" not in params:
        raise UserError(f"{type(lm).__name__}: its base model has no `embeddings` module taking input_ids and "
                        f"inputs_embeds, which the RetroMAE decoder calls for its key/value and query streams. "
                        f"Use a BERT/RoBERTa/XLM-R style model.")
    return embeddings


ROW_BLOCK_ELEMENTS = 1 << 26  # elementwise passes over the logits go ~64M values (256 MB fp32) at a time


class _SummedCrossEntropy(torch.autograd.Function):
    """sum_i -log_softmax(z_i)[y_i] in fp32 over rows with y_i != -100 (the others add 0 and get a zero
    gradient). Keeps only the logits (bf16 under mixed precision) for backward and writes
    softmax(z) - onehot(y) straight into a gradient of the logits' dtype; the fp32 passes run over
    blocks of rows, so no full-size fp32 copy of the logits ever exists."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        wide, step = _wide(logits.dtype), _row_block(logits)
        valid = target != IGNORE_INDEX
        safe = target.clamp(min=0)
        loss = logits.new_zeros((), dtype=wide)
        for start in range(0, logits.shape[0], step):
            log_probs = torch.log_softmax(logits[start:start + step], dim=-1, dtype=wide)
            picked = log_probs.gather(1, safe[start:start + step, None]).squeeze(1)
            loss = loss - torch.where(valid[start:start + step], picked, 0).sum()
        ctx.save_for_backward(logits, target)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, target = ctx.saved_tensors
        wide, step = _wide(logits.dtype), _row_block(logits)
        valid = target != IGNORE_INDEX
        safe = target.clamp(min=0)
        out = torch.empty_like(logits)
        for start in range(0, logits.shape[0], step):
            probs = torch.softmax(logits[start:start + step], dim=-1, dtype=wide)
            probs.scatter_add_(1, safe[start:start + step, None], probs.new_full((probs.shape[0], 1), -1.0))
            scale = torch.where(valid[start:start + step, None], grad, 0)
            out[start:start + step] = probs.mul_(scale)
        return out, None


def _row_block(logits: torch.Tensor) -> int:
    return max(1, ROW_BLOCK_ELEMENTS // max(1, logits.shape[-1]))


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def summed_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over rows; `F.cross_entropy(..., reduction='sum', ignore_index=-100)`."""
    return _SummedCrossEntropy.apply(logits, target)


def _logits_loss(logits: torch.Tensor, target: torch.Tensor, count_correct: bool = True):
    with torch.no_grad():
        correct = (logits.argmax(-1) == target).sum() if count_correct else target.new_zeros(())
    return summed_cross_entropy(logits, target), correct


def _rows_loss(head: nn.Module, rows: torch.Tensor, target: torch.Tensor, count_correct: bool = True):
    return _logits_loss(head(rows), target, count_correct)


def labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, capacity: int | None = None):
    """(rows [N, H], targets [N]) of the positions whose label is not -100.

    Without `capacity`, exactly those rows (N known only on the device: a host sync). With it, N =
    capacity rows (the labelled ones first, in order, then filler rows with target -100), a fixed shape
    without a sync; a capacity that does not hold them all fails on the device (an asynchronous assert).
    """
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if capacity is None:
        keep = flat_labels != IGNORE_INDEX
        return flat_hidden[keep], flat_labels[keep]
    if capacity >= flat_labels.numel():
        return flat_hidden, flat_labels
    ignored = (flat_labels == IGNORE_INDEX).to(torch.uint8)
    torch._assert_async(flat_labels.numel() - ignored.sum() <= capacity,
                        "more labelled positions than the static capacity of the MLM head's row selection")
    index = torch.argsort(ignored, stable=True)[:capacity]
    return flat_hidden.index_select(0, index), flat_labels.index_select(0, index)


def head_calls(rows: int, chunk_size: int | None, max_rows: int | None = None) -> int:
    """How many chunks (head calls) a projection of `rows` rows takes: one without `chunk_size`; with it,
    ceil(max_rows / chunk_size) when a host-known bound `max_rows` is given (the same on every rank, see
    `labelled_rows_loss`), else ceil(rows / chunk_size). Never fewer than the rows need."""
    if not chunk_size:
        return 1
    return max(1, -(-max(rows, max_rows or 0) // chunk_size))


def labelled_rows_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
                       count_correct: bool = True, capacity: int | None = None, max_rows: int | None = None):
    """Fast head: (loss summed over labelled positions, number of them predicted right; 0 unless
    `count_correct`).

    Projects only the hidden rows whose label is not -100 (`capacity`: a fixed number of rows, see
    `labelled_rows`); with `chunk_size`, at most that many rows per head call, under activation
    checkpointing when grad is on (also without grad: an evaluation's logits are bounded the same way).

    `max_rows`: a bound on the rows known before the batch is seen (micro-batch size x block length).
    The number of head calls then follows from it alone, trailing chunks being empty, because under
    ZeRO-3 every call gathers the vocabulary projection (a collective): ranks whose batches have
    different widths or label counts must still call the head equally often.
    """
    rows, target = labelled_rows(hidden, labels, capacity)
    count = target.numel()
    calls = head_calls(count, chunk_size, max_rows)
    if calls == 1:
        return _rows_loss(head, rows, target, count_correct)
    loss, correct = rows.new_zeros((), dtype=torch.float32), target.new_zeros(())
    grad = torch.is_grad_enabled()
    for start in range(0, calls * chunk_size, chunk_size):
        args = (head, rows[start:start + chunk_size], target[start:start + chunk_size], count_correct)
        part_loss, part_correct = checkpoint(_rows_loss, *args, use_reentrant=False) if grad else _rows_loss(*args)
        loss, correct = loss + part_loss, correct + part_correct
    return loss, correct


def dense_logits_loss(logits: torch.Tensor, labels: torch.Tensor):
    """Naive head loss on full [B, L, V] logits (the reference's way); same return as the fast one."""
    flat, target = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    loss = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    keep = target != IGNORE_INDEX
    with torch.no_grad():
        correct = (flat.argmax(-1)[keep] == target[keep]).sum()
    return loss, correct


def max_pool_logits(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DupMAE's bag-of-words vector: max over kept positions of [B, L, V] logits -> [B, V] (fp32).

    `torch.max(dim)` keeps only the argmax indices for backward, so the logits can be freed.
    """
    masked = logits.masked_fill(~keep[..., None], torch.finfo(logits.dtype).min)
    return masked.max(dim=1).values.float()


def _pool_chunk(head, hidden, labels, keep, static):
    logits = head(hidden)
    if static:  # every row, unlabelled ones counting zero: no data-dependent shape
        loss, correct = _logits_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    else:
        sel = labels != IGNORE_INDEX
        loss, correct = _logits_loss(logits[sel], labels[sel])
    if logits.shape[1] == 0:  # an empty trailing chunk (see pooled_and_labelled_loss): adds nothing to the max
        pooled = logits.new_full((logits.shape[0], logits.shape[-1]), torch.finfo(logits.dtype).min).float()
    else:
        pooled = max_pool_logits(logits, keep)
    return pooled, loss, correct


def pooled_and_labelled_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                             chunk_size: int | None = None, static: bool = False, max_length: int | None = None):
    """For DupMAE (which needs logits at every position anyway): one head pass gives both the
    max-pooled bag-of-words vector over `keep` positions and the MLM loss on labelled positions.

    Returns (pooled [B, V] fp32, loss sum, number right). With `chunk_size`,
    positions are processed in slices of about chunk_size rows (under activation checkpointing when grad
    is on). `max_length`: a host-known bound on the width (the block length); the number of slices
    then follows from it rather than from this batch's width, trailing slices being empty, so that every
    rank calls the head equally often (ZeRO-3 gathers it in each call; see `labelled_rows_loss`).
    `static`: the loss runs over every row (unlabelled ones add zero) instead of selecting the
    labelled ones, so no shape depends on the data (no host sync).
    """
    batch, length = labels.shape
    step = length if not chunk_size else max(1, chunk_size // max(batch, 1))
    span = max(length, max_length or 0) if chunk_size else length
    pooled, loss, correct = None, None, None
    for start in range(0, max(span, 1), step):
        args = (head, hidden[:, start:start + step], labels[:, start:start + step], keep[:, start:start + step],
                static)
        if step < span and torch.is_grad_enabled():
            part = checkpoint(_pool_chunk, *args, use_reentrant=False)
        else:
            part = _pool_chunk(*args)
        # ties (e.g. a zero embedding row gives equal logits everywhere) keep the earlier chunk, like
        # one max over all positions, so the gradient goes to the same position either way
        pooled = part[0] if pooled is None else torch.where(part[0] > pooled, part[0], pooled)
        loss = part[1] if loss is None else loss + part[1]
        correct = part[2] if correct is None else correct + part[2]
    return pooled, loss, correct


def bag_of_words_targets(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """DupMAE targets [B, V]: each distinct labelled id of a sample weighs 1 / (its labelled count).

    As in the reference, weights of repeated ids are not summed, so a row sums to
    (#distinct / #tokens) <= 1.
    """
    keep = labels != IGNORE_INDEX
    count = keep.sum(1, keepdim=True).clamp(min=1)
    weight = keep.float() / count
    targets = torch.zeros(labels.shape[0], vocab_size, dtype=torch.float32, device=labels.device)
    return targets.scatter_reduce_(1, labels.clamp(min=0), weight, reduce="amax")


def bag_of_words_loss(pooled: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over samples of -sum_v target_v * log_softmax(pooled)_v."""
    return -(targets * torch.log_softmax(pooled.float(), dim=-1)).sum(-1).mean()

"""Tokenizing and packing documents on ``num_proc`` worker processes, in order, with flat memory.

Each batch of documents is tokenized once per document (offsets included) and packed into blocks by
:mod:`retromae_ds.data.packing`; a worker returns the ids, block sizes and blocks per document.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
from typing import Iterable, Iterator

from retromae_ds.data.packing import pack_blocks, sentence_end_chars, sentence_starts

TOKENIZE_BATCH_DOCS = 512
TOKENIZE_BATCH_CHARS = 256 * 1024
NO_LENGTH_LIMIT = int(1e30)  # transformers' own model_max_length for "no limit" (VERY_LARGE_INTEGER)

_WORKER: dict = {}


def init_worker(tokenizer, capacity: int, in_pool: bool = False) -> None:
    """Per-process state of a tokenizer worker (also used in-process when num_proc == 1)."""
    if in_pool:  # Ctrl-C is handled once, by the parent, which then stops the pool
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from num_proc
    # Whole documents are tokenized on purpose (blocks are cut afterwards), so the model's length
    # limit does not apply: lifting it on the worker's copy stops exactly transformers' "Token indices
    # sequence length is longer than the specified maximum sequence length" warning, in every process.
    # A shallow copy (sharing the Rust tokenizer) leaves the caller's tokenizer as it was.
    tokenizer = copy.copy(tokenizer)
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    _WORKER.update(tokenizer=tokenizer, capacity=capacity)


def tokenize_batch(texts: list[str]):
    """Tokenize and pack documents: (all ids, block sizes, blocks per kept document, empty count)."""
    import numpy as np

    capacity = _WORKER["capacity"]
    ids_parts, sizes, counts, empty = [], [], [], 0
    # The wrapper (not tokenizer.backend_tokenizer) ignores the padding/truncation that a
    # tokenizer.json may carry (MiniLM's pads and truncates to 128); it measured as fast.
    encoded = _WORKER["tokenizer"](texts, add_special_tokens=False, return_offsets_mapping=True,
                                   return_attention_mask=False, return_token_type_ids=False)
    for text, ids, offsets in zip(texts, encoded["input_ids"], encoded["offset_mapping"]):
        if not ids:
            empty += 1
            continue
        ends = sentence_end_chars(text)
        starts = []
        if ends:
            token_starts = np.fromiter((o[0] for o in offsets), np.int64, len(offsets))
            starts = sentence_starts(token_starts, ends, len(ids))
        block_sizes = pack_blocks(len(ids), starts, capacity)
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        sizes.extend(block_sizes)
        counts.append(len(block_sizes))
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    return ids_all, np.asarray(sizes, np.int32), np.asarray(counts, np.int32), empty


def rebatch(batches: Iterable[list[str]], limit: int | None) -> Iterator[list[str]]:
    """Regroup into batches of at most TOKENIZE_BATCH_DOCS documents / TOKENIZE_BATCH_CHARS characters."""
    out, chars, taken = [], 0, 0
    for batch in batches:
        for text in batch:
            if limit is not None and taken >= limit:
                break
            out.append(text)
            chars += len(text)
            taken += 1
            if len(out) >= TOKENIZE_BATCH_DOCS or chars >= TOKENIZE_BATCH_CHARS:
                yield out
                out, chars = [], 0
        if limit is not None and taken >= limit:
            break
    if out:
        yield out


def default_num_proc() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


@contextlib.contextmanager
def tokenizer_pool(tokenizer, capacity: int, num_proc: int):
    """A function mapping document batches to packed results, in order, on ``num_proc`` processes.

    At most 2 x num_proc batches are in flight, so memory stays flat however large the corpus is.
    """
    if num_proc == 1:
        init_worker(tokenizer, capacity)
        yield lambda batches: map(tokenize_batch, batches)
        return
    import multiprocessing

    # fork: workers start in milliseconds and inherit the loaded tokenizer; the pool is created
    # before any reader thread exists.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = context.Pool(num_proc, initializer=init_worker, initargs=(tokenizer, capacity, True))

    def ordered(batches):
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield ordered
        pool.close()
    finally:
        pool.terminate()
        pool.join()

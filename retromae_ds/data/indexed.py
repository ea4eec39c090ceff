"""Packed, memory-mapped token blocks on disk, and the views the trainer reads them through.

File format (version 1; all integers little-endian). A dataset is three files sharing one PREFIX:

``PREFIX.bin``
    The token ids of every block, back to back, as a flat array of ``dtype`` (``uint16`` when the
    tokenizer's vocabulary fits in 65,500 ids, else ``int32``). Blocks hold no [CLS]/[SEP]: the
    trainer adds them, so a block is at most ``max_seq_len - 2`` ids. The blocks of one document are
    consecutive, and so are the documents, so a document is a contiguous slice too.

``PREFIX.idx``
    A 64-byte header followed by three arrays::

        offset  size  field
        0       8     magic  b"RMAEIDX\\x00"
        8       4     version (uint32) = 1
        12      4     dtype code (uint32): 1 = uint16, 2 = int32
        16      8     num_blocks (uint64)
        24      8     num_documents (uint64)
        32      8     num_tokens (uint64) = length of PREFIX.bin in ids
        40      16    build_id: random bytes, also stored in PREFIX.json, so that files of two
                      different runs are never mistaken for one dataset
        56      8     reserved, zero
        64            pointers  int64[num_blocks]        byte offset of each block in PREFIX.bin
                      doc_index int64[num_documents + 1]  first block of each document; last = num_blocks
                      sizes     int32[num_blocks]        number of ids in each block

    The 8-byte arrays come first so that every array is aligned for zero-copy memory mapping.

``PREFIX.json``
    Human-readable metadata: ``format_version``, ``build_id`` (hex), ``max_seq_len``, ``dtype``,
    counts (``num_documents``, ``num_blocks``, ``num_tokens``, ``dropped_empty_documents``,
    ``skipped_bad_records``), ``sources`` and ``tokenizer`` (see :func:`tokenizer_fingerprint`).

Writing is atomic: the writer fills ``*.partial`` files and renames them at the end, ``.idx`` last.
A dataset whose ``.idx`` exists is therefore complete; an interrupted run leaves only ``.partial``
files, which nothing opens. Opening checks the header, the array sizes, the length of ``.bin`` and
that the three files come from the same run, so a truncated or mixed-up dataset fails loudly instead
of training on garbage.

This is the layout of Megatron-LM's indexed dataset (one flat token file plus an index of sizes,
pointers and document boundaries, memory-mapped by every rank) with our own magic and header.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import mmap
import operator
import os
import struct
from typing import Any, Sequence

import numpy as np

from retromae_ds.data.sampler import INT32_LIMIT, seeded_permutation
from retromae_ds.errors import UserError

FORMAT_VERSION = 1
MAGIC = b"RMAEIDX\x00"
HEADER = struct.Struct("<8sIIQQQ16s8x")
assert HEADER.size == 64
DTYPE_CODES = {1: np.dtype(np.uint16), 2: np.dtype(np.int32)}
UINT16_VOCAB_LIMIT = 65_500
PARTIAL = ".partial"
# Blocks the open-time check (IndexedDataset._check_arrays) reads at a time. Every rank opens the index,
# and a check of all blocks at once built ~25 bytes of temporaries per block (int64 sizes, their offsets,
# comparison masks): 2.5 GB per rank at 100M blocks, 20 GB on an 8-GPU node at the same moment. Per chunk
# they are one reused int64 offset buffer and one comparison mask, ~9 bytes per block of the chunk: ~9 MB
# for 1M blocks, large enough that numpy's per-call overhead stays negligible.
CHECK_CHUNK_BLOCKS = 1 << 20
TOKENIZER_KEYS = ("vocab_hash", "vocab_size", "cls_token_id", "sep_token_id", "pad_token_id",
                  "mask_token_id", "unk_token_id")


def dataset_paths(prefix: str) -> dict[str, str]:
    """The three file names of a dataset (``bin``, ``idx``, ``json``)."""
    return {ext: f"{prefix}.{ext}" for ext in ("bin", "idx", "json")}


def normalize_prefix(path: str) -> str:
    """Accept ``data/wiki``, ``data/wiki.idx`` or ``data/wiki.bin`` for the same dataset."""
    for ext in (".bin", ".idx", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def choose_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the file size; ids up to 65,500 leave headroom below 65,535."""
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def _dtype_code(dtype: np.dtype) -> int:
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise ValueError(f"unsupported token dtype {dtype}; use one of {sorted(map(str, DTYPE_CODES.values()))}")


# --------------------------------------------------------------------------------------------
# Tokenizer identity
# --------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What must agree between the tokenizer that wrote a dataset and the model that trains on it.

    ``vocab_hash`` is the sha256 of the sorted (token, id) pairs, so it is the same in every process
    and on every machine. It does not see normalisation (e.g. lower-casing), which the name shows.
    """
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items())
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": max(len(tokenizer), max(vocab.values(), default=-1) + 1),
        "vocab_hash": digest.hexdigest(),
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "unk_token_id": tokenizer.unk_token_id,
    }


def check_tokenizer_matches(meta: dict, tokenizer, prefix: str) -> None:
    """Refuse to train a model on ids written by a different tokenizer.

    ``meta`` is a dataset's metadata (``IndexedDataset.meta``) or its ``"tokenizer"`` entry.
    """
    written = meta.get("tokenizer", meta)
    current = tokenizer_fingerprint(tokenizer)
    differences = [f"{key} {written.get(key)!r} vs {current[key]!r}"
                   for key in TOKENIZER_KEYS if written.get(key) != current[key]]
    if differences:
        raise UserError(
            f"dataset {prefix} was tokenized with {written.get('class')} from "
            f"'{written.get('name_or_path')}', which does not match the model's tokenizer "
            f"{current['class']} from '{current['name_or_path']}' (dataset vs model: "
            f"{'; '.join(differences)}). Token ids would mean different words. Re-run "
            f"`retromae-ds prepare --tokenizer <the model's tokenizer folder>` for this model, or train "
            f"the model whose tokenizer prepared the dataset.")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

class IndexedDatasetWriter:
    """Appends documents (ids plus block sizes) to ``PREFIX.bin`` and writes the index at the end.

    Use as a context manager: leaving the block with an exception (or without :meth:`finalize`)
    deletes the partial files, so a failed run leaves nothing that looks like a dataset. A write that
    fails (disk full, quota, read-only folder) deletes them at once, which gives the space back, and
    raises a UserError naming the file, what it holds and how to fix it.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        self._limits = np.iinfo(self.dtype)
        self._paths = dataset_paths(prefix)
        self._partial = {ext: path + PARTIAL for ext, path in self._paths.items()}
        self._sizes: list[np.ndarray] = []
        self._doc_blocks: list[np.ndarray] = []
        self.num_tokens = 0
        self.num_blocks = 0
        self.num_documents = 0
        self._done = False
        self._bin = None
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            self._bin = open(self._partial["bin"], "wb")
        except OSError as err:
            raise self._write_failed("bin", err) from err

    def add_document(self, ids: Sequence[int], block_sizes: Sequence[int]) -> None:
        """One document: its ids in order and how they are cut into blocks."""
        self.add_documents(ids, block_sizes, [len(block_sizes)])

    def add_documents(self, ids, block_sizes, doc_block_counts) -> None:
        """Several documents at once: ids of all of them, all block sizes, blocks per document."""
        ids = np.asarray(ids)
        sizes = np.asarray(block_sizes, dtype=np.int64)
        counts = np.asarray(doc_block_counts, dtype=np.int64)
        if sizes.sum() != len(ids) or counts.sum() != len(sizes):
            raise ValueError(f"{len(ids)} ids, block sizes summing to {sizes.sum()} over {len(sizes)} "
                             f"blocks, block counts summing to {counts.sum()}: they must agree")
        if (sizes < 1).any() or (counts < 1).any():
            raise ValueError("every block needs at least one id and every document at least one block")
        if len(ids) and (ids.min() < self._limits.min or ids.max() > self._limits.max):
            raise ValueError(f"token id range [{ids.min()}, {ids.max()}] does not fit {self.dtype}")
        try:
            self._bin.write(np.ascontiguousarray(ids, dtype=self.dtype).data)
        except OSError as err:
            raise self._write_failed("bin", err) from err
        self._sizes.append(sizes.astype(np.int32))
        self._doc_blocks.append(counts)
        self.num_tokens += len(ids)
        self.num_blocks += len(sizes)
        self.num_documents += len(counts)

    def finalize(self, meta: dict | None = None) -> dict:
        """Write index and metadata, then rename all three files into place (``.idx`` last).

        Each file is flushed to disk (fsync) before any rename, and the renames are made durable,
        so even a crash at any point leaves either the complete new dataset or no ``.idx``.
        """
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int32)
        doc_blocks = np.concatenate(self._doc_blocks) if self._doc_blocks else np.zeros(0, np.int64)
        pointers = np.zeros(len(sizes), np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_index = np.zeros(len(doc_blocks) + 1, np.int64)
        np.cumsum(doc_blocks, out=doc_index[1:])
        build_id = os.urandom(16)
        full_meta = dict(meta or {})
        full_meta.update(format_version=FORMAT_VERSION, build_id=build_id.hex(), dtype=self.dtype.name,
                         num_documents=self.num_documents, num_blocks=self.num_blocks,
                         num_tokens=self.num_tokens)
        meta_text = json.dumps(full_meta, indent=2, ensure_ascii=False) + "\n"
        step = "bin"
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            step = "idx"
            header = HEADER.pack(MAGIC, FORMAT_VERSION, self._code, self.num_blocks, self.num_documents,
                                 self.num_tokens, build_id)
            _write_synced(self._partial["idx"], [header, pointers.data, doc_index.data, sizes.data])
            step = "json"
            _write_synced(self._partial["json"], [meta_text.encode("utf-8")])
        except OSError as err:
            raise self._write_failed(step, err) from err
        placed, ext = [], "idx"
        try:
            if os.path.exists(self._paths["idx"]):  # an older dataset: invalidate it before replacing
                os.remove(self._paths["idx"])
            for ext in ("bin", "json", "idx"):
                os.replace(self._partial[ext], self._paths[ext])
                placed.append(self._paths[ext])
        except OSError as err:
            for path in placed:  # this run's files without their .idx: remove them too
                os.remove(path)
            raise self._write_failed(ext, err) from err
        _sync_folder(os.path.dirname(os.path.abspath(self.prefix)))
        self._done = True
        return full_meta

    def abort(self) -> None:
        """Close and delete the partial files (nothing final is touched)."""
        if self._bin is not None:
            try:
                self._bin.close()
            except OSError:  # the flush of buffered ids failed again (disk still full): the file is closed
                pass
        for path in self._partial.values():
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def _write_failed(self, ext: str, err: OSError) -> UserError:
        """Delete every partial file (frees the space), then explain the failed write of ``ext``."""
        self.abort()
        path = self._partial[ext]
        what = {"bin": "the token ids", "idx": "the block index", "json": "the metadata"}[ext]
        folder = os.path.dirname(os.path.abspath(path))
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            written = self.num_tokens * self.dtype.itemsize / 2**20
            fix = (f"The disk (or your quota) is full: free space there (`df -h {folder}` shows what is left; "
                   f"this dataset needs more than the {written:,.1f} MB of token ids written so far), or "
                   f"choose another --output on a disk with room")
        else:
            fix = f"Check that {folder} is writable, or choose another --output"
        return UserError(f"could not write {path} ({what} of the dataset {self.prefix}): {err.strerror} "
                         f"[errno {err.errno}]. The unfinished files of this run "
                         f"({os.path.basename(self.prefix)}.*{PARTIAL}) were removed. {fix}.")

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self.abort()


def _write_synced(path: str, chunks) -> None:
    """Write ``chunks`` (bytes-like) to ``path`` and flush them to disk before returning."""
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(folder: str) -> None:
    """Make the renames in ``folder`` durable (best effort: not every filesystem syncs folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def _damaged(prefix: str, path: str, problem: str) -> UserError:
    return UserError(f"{path}: {problem}. The dataset is damaged or incomplete; re-run "
                     f"`retromae-ds prepare --output {prefix} --overwrite ...` to rebuild it.")


def read_meta(prefix: str) -> dict:
    """The metadata (PREFIX.json) of the prepared dataset at `prefix`, after checking that its three
    files exist: the first, cheap part of opening it (the trainer's start-up check reads only this)."""
    prefix = normalize_prefix(prefix)
    paths = dataset_paths(prefix)
    if not os.path.exists(paths["idx"]):
        leftovers = [p + PARTIAL for p in paths.values() if os.path.exists(p + PARTIAL)]
        hint = (f" Only unfinished files of an interrupted prepare exist ({', '.join(leftovers)}); "
                f"run prepare again.") if leftovers else ""
        raise UserError(f"no prepared dataset at {prefix}: {paths['idx']} does not exist.{hint} "
                        f"Create one with `retromae-ds prepare --output {prefix} ...` "
                        f"(or `--demo`).")
    for ext in ("bin", "json"):
        if not os.path.exists(paths[ext]):
            raise _damaged(prefix, paths[ext], "missing")
    with open(paths["json"], encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise _damaged(prefix, paths["json"], f"not valid JSON ({err})") from None


class IndexedDataset:
    """Read-only, memory-mapped view of a prepared dataset: ``ds[i]`` is block i's ids.

    ``ds[i]`` is a zero-copy numpy view into ``PREFIX.bin`` without [CLS]/[SEP]. Attributes:
    ``sizes`` (ids per block), ``doc_index`` (first block of each document, then ``len(ds)``),
    ``num_documents``, ``num_tokens``, ``meta`` (``PREFIX.json``), ``prefix``.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = normalize_prefix(prefix)
        self._open()

    def _fail(self, path: str, problem: str) -> UserError:
        return _damaged(self.prefix, path, problem)

    def _open(self) -> None:
        paths = dataset_paths(self.prefix)
        self.meta = read_meta(self.prefix)
        idx_len = os.path.getsize(paths["idx"])
        if idx_len < HEADER.size:
            raise self._fail(paths["idx"], f"only {idx_len} bytes, shorter than the {HEADER.size}-byte header")
        with open(paths["idx"], "rb") as f:
            magic, version, code, nb, nd, nt, build_id = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise self._fail(paths["idx"], f"wrong magic {magic!r} (expected {MAGIC!r}): not a retromae-ds index")
        if version != FORMAT_VERSION:
            raise self._fail(paths["idx"], f"format version {version}, this code reads {FORMAT_VERSION}")
        if code not in DTYPE_CODES:
            raise self._fail(paths["idx"], f"unknown dtype code {code}")
        expected = HEADER.size + 8 * nb + 8 * (nd + 1) + 4 * nb
        if idx_len != expected:
            raise self._fail(paths["idx"], f"{idx_len} bytes, expected {expected} for {nb} blocks and "
                                           f"{nd} documents (truncated or corrupt)")
        if self.meta.get("build_id") != build_id.hex():
            raise self._fail(paths["json"], "build_id differs from the one in the .idx header: the files "
                                            "come from different prepare runs")
        self.dtype = DTYPE_CODES[code]
        bin_len = os.path.getsize(paths["bin"])
        if bin_len != nt * self.dtype.itemsize:
            raise self._fail(paths["bin"], f"{bin_len} bytes, expected {nt * self.dtype.itemsize} "
                                           f"({nt} ids of {self.dtype}; truncated or corrupt)")

        self._idx_file = open(paths["idx"], "rb")
        self._idx_map = mmap.mmap(self._idx_file.fileno(), 0, access=mmap.ACCESS_READ)
        self._pointers = np.frombuffer(self._idx_map, np.int64, nb, HEADER.size)
        self.doc_index = np.frombuffer(self._idx_map, np.int64, nd + 1, HEADER.size + 8 * nb)
        self.sizes = np.frombuffer(self._idx_map, np.int32, nb, HEADER.size + 8 * nb + 8 * (nd + 1))
        if nt:
            self._bin_file = open(paths["bin"], "rb")
            self._bin_map = mmap.mmap(self._bin_file.fileno(), 0, access=mmap.ACCESS_READ)
            self._tokens = np.frombuffer(self._bin_map, self.dtype)
        else:
            self._bin_file = self._bin_map = None
            self._tokens = np.zeros(0, self.dtype)
        self.num_documents = int(nd)
        self.num_tokens = int(nt)
        self._check_arrays()

    def _check_arrays(self) -> None:
        """Cheap vectorised consistency checks (a few ms per million blocks), `CHECK_CHUNK_BLOCKS` blocks
        at a time so that every rank's temporaries stay small. Whatever the chunk, a damaged index gets
        the error it would get from one pass over all of it: empty blocks first, then the total, then
        the pointers, then the document index."""
        idx = dataset_paths(self.prefix)["idx"]
        chunk = CHECK_CHUNK_BLOCKS
        num_blocks = len(self.sizes)
        offset = 0                 # ids in the blocks before this chunk: where its first block starts
        pointers_agree = True      # reported only after the total, which is known after the last chunk
        buffer = np.empty(min(chunk, num_blocks), np.int64)     # the one int64 temporary, reused per chunk
        for first in range(0, num_blocks, chunk):
            sizes = self.sizes[first:first + chunk]              # an int32 view of the map: no copy
            if sizes.min() < 1:
                raise self._fail(idx, "a block has no ids")
            ends = buffer[:len(sizes)]
            ends[:] = sizes                                      # widened into the buffer, summed in place
            np.cumsum(ends, out=ends)                            # (cumsum(sizes, dtype=int64) copies first)
            end = offset + int(ends[-1])
            if pointers_agree:
                starts = ends                                    # in place: a block starts at its end
                starts -= sizes                                  # minus its size, in the chunk's ids ...
                starts += offset                                 # ... then in the file's
                starts *= self.dtype.itemsize
                pointers_agree = np.array_equal(starts, self._pointers[first:first + chunk])
            offset = end
        if offset != self.num_tokens:
            raise self._fail(idx, f"block sizes sum to {offset}, header says {self.num_tokens} ids")
        if not pointers_agree:
            raise self._fail(idx, "block pointers disagree with block sizes")
        d = self.doc_index
        increasing = d[0] == 0 and d[-1] == num_blocks
        for first in range(0, len(d) - 1, chunk):
            if not increasing:
                break
            last = min(first + chunk, len(d) - 1)                # entry pairs (i, i + 1) for i in [first, last)
            increasing = bool((d[first + 1:last + 1] > d[first:last]).all())
        if not increasing:
            raise self._fail(idx, "document index is not increasing from 0 to the number of blocks")
        for key, value in (("num_documents", self.num_documents), ("num_blocks", num_blocks),
                           ("num_tokens", self.num_tokens)):
            if self.meta.get(key) != value:
                raise self._fail(dataset_paths(self.prefix)["json"],
                                 f"{key} is {self.meta.get(key)}, the index says {value}")

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        n = len(self.sizes)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        start = int(self._pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[i])]

    def document(self, k: int) -> np.ndarray:
        """All ids of document k (its blocks are contiguous, so this is a view too)."""
        first, last = int(self.doc_index[k]), int(self.doc_index[k + 1])
        start = int(self._pointers[first]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sizes[first:last].sum())]

    def __getstate__(self) -> dict:  # reopen in the receiving process instead of pickling mmaps
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {len(self)} blocks, {self.num_documents} documents, "
                f"{self.num_tokens} ids, {self.dtype})")


class BlockSubset:
    """Blocks ``[start, end)`` of a dataset, e.g. the last documents held out for evaluation."""

    def __init__(self, dataset, start: int, end: int) -> None:
        n = len(dataset)
        start, end = operator.index(start), operator.index(end)
        if not 0 <= start <= end <= n:
            raise ValueError(f"block range [{start}, {end}) is not inside [0, {n})")
        self.dataset, self.start, self.end = dataset, start, end
        if hasattr(dataset, "sizes"):
            self.sizes = dataset.sizes[start:end]
        self.meta = getattr(dataset, "meta", {})

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> np.ndarray:
        i = operator.index(i)
        n = self.end - self.start
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for a subset of {n} blocks")
        return self.dataset[self.start + i]


class BlendedDataset:
    """Datasets mixed by weight, where every block of every dataset is reached over the epochs.

    Addressing: ``blend[i]`` is block ``i`` of the datasets laid end to end (dataset k's block b is
    ``offsets[k] + b``), and ``sizes[i]`` is its length. Both are fixed, whatever the epoch, so the
    trainer reads and counts tokens by id as for a single dataset.

    Weights decide which ids make up each epoch. An epoch has ``samples_per_epoch`` samples (``size``,
    default: all blocks) shared out as ``counts`` in proportion to the weights (largest remainder, so
    the counts are exact). Dataset k's share of epoch e is the next ``counts[k]`` steps of an endless
    walk through a seeded permutation of its blocks, i.e. walk steps [e * n_k, (e + 1) * n_k) modulo
    its length. Any ``len(dataset k)`` consecutive steps reach each of its blocks once: a down-sampled
    dataset shows other blocks each epoch until all were seen, an up-sampled one repeats its blocks
    evenly. (A fixed sample -> block map, the earlier design, froze the epoch's blocks: with sizes
    100/900 and weights 0.5/0.5, 400 blocks were never trained on.)

    Why the epoch goes through the sampler (:meth:`GlobalBatchSampler.for_dataset
    <retromae_ds.data.sampler.GlobalBatchSampler.for_dataset>` calls :meth:`epoch_samples`) rather than
    a longer virtual dataset covering several epochs: an epoch stays ``size`` samples (so ``--epochs``
    keeps its meaning), resume stays the sampler's (epoch, consumed), and memory stays one int32
    permutation per dataset instead of growing with the number of epochs covered. The order within an
    epoch is the sampler's seeded permutation of the positions; positions are laid out dataset by
    dataset (dataset 0's share first), which is the order without shuffling.
    """

    def __init__(self, datasets: list, weights: list[float], seed: int, size: int | None = None) -> None:
        if not datasets or len(datasets) != len(weights):
            raise UserError(f"blending needs one weight per dataset; got {len(datasets)} datasets and "
                            f"{len(weights)} weights. Give the same number of each.")
        w = np.asarray(weights, dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"blend weights {list(weights)} must be non-negative numbers, not all zero.")
        lengths = np.array([len(d) for d in datasets], dtype=np.int64)
        empty = [i for i, (n, wi) in enumerate(zip(lengths, w)) if n == 0 and wi > 0]
        if empty:
            raise UserError(f"blended dataset #{empty[0]} is empty but has weight {w[empty[0]]}; "
                            f"remove it or give it weight 0.")
        self.datasets = list(datasets)
        self.weights = w / w.sum()
        self.seed = int(seed)
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # dataset k: [o[k], o[k+1])
        self.samples_per_epoch = int(lengths.sum()) if size is None else int(size)
        if self.samples_per_epoch < 1:
            raise UserError(f"a blend needs at least one sample; size is {self.samples_per_epoch}.")
        exact = self.weights * self.samples_per_epoch
        counts = np.floor(exact).astype(np.int64)
        remainders = np.where(w > 0, exact - counts, -1.0)  # weight 0 (maybe empty): never rounded up
        remainder_order = np.argsort(-remainders, kind="stable")
        counts[remainder_order[: self.samples_per_epoch - counts.sum()]] += 1
        self.counts = counts
        self._share_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        # Dataset k's walk: a seeded permutation of its local block ids, stored at [o[k], o[k+1]).
        self._walk = np.zeros(int(lengths.sum()), np.int32 if lengths.max() <= INT32_LIMIT else np.int64)
        for k, length in enumerate(lengths):
            if counts[k]:
                seeded_permutation([self.seed, k], int(length), out=self._walk[self.offsets[k]:self.offsets[k + 1]])
        digest = hashlib.sha256(json.dumps({"lengths": lengths.tolist(), "counts": counts.tolist(),
                                            "seed": self.seed}).encode()).hexdigest()[:16]
        self.order_id = f"{len(lengths)} datasets of {lengths.tolist()} blocks x {counts.tolist()} per epoch ({digest})"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for a blend of {n} blocks")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def __getitem__(self, i: int):
        k, b = self._locate(i)
        return self.datasets[k][b]

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Block lengths by id (int32: 4 bytes per block), when every dataset has ``sizes``."""
        if not all(hasattr(d, "sizes") for d in self.datasets):
            raise AttributeError("sizes: a blended dataset has no per-block sizes")
        sizes = np.empty(len(self), np.int32)
        for k, d in enumerate(self.datasets):
            sizes[self.offsets[k]:self.offsets[k + 1]] = d.sizes  # no int64 copy per dataset
        return sizes

    def epoch_samples(self, epoch: int, positions=None) -> np.ndarray:
        """The block ids at ``positions`` (default: all, in layout order) of epoch ``epoch``.

        Position p belongs to dataset k when ``share_start[k] <= p < share_start[k] + counts[k]``;
        it is step ``epoch * counts[k] + (p - share_start[k])`` of dataset k's walk. Computed per
        position, so a sampler asks only for the window it hands out.
        """
        if positions is None:
            positions = np.arange(self.samples_per_epoch, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= self.samples_per_epoch):
            raise IndexError(f"positions outside [0, {self.samples_per_epoch}) for a blend epoch")
        k = np.searchsorted(self._share_starts, positions, side="right") - 1
        step = int(epoch) * self.counts[k] + (positions - self._share_starts[k])
        local = self._walk[self.offsets[k] + step % self.lengths[k]]
        return self.offsets[k] + local

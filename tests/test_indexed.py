"""The on-disk format: writing, zero-copy reading, validation of damaged files, subsets, blends,
and the tokenizer identity check."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from retromae_ds.data.indexed import (BlendedDataset, BlockSubset, IndexedDataset, IndexedDatasetWriter,
                                      check_tokenizer_matches, choose_dtype, tokenizer_fingerprint)
from retromae_ds.errors import UserError

DOCS = [  # (ids, block sizes)
    ([5, 6, 7, 8, 9], [3, 2]),
    ([10], [1]),
    ([11, 12, 13, 14, 15, 16, 17], [2, 2, 3]),
]


def write_docs(prefix, docs=DOCS, dtype=np.uint16, meta=None):
    with IndexedDatasetWriter(str(prefix), dtype) as writer:
        for ids, sizes in docs:
            writer.add_document(ids, sizes)
        return writer.finalize(meta or {"max_seq_len": 10})


def expected_blocks(docs=DOCS):
    blocks = []
    for ids, sizes in docs:
        start = 0
        for size in sizes:
            blocks.append(ids[start:start + size])
            start += size
    return blocks


def test_round_trip_blocks_documents_and_counts(tmp_path):
    meta = write_docs(tmp_path / "d")
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 6 and ds.num_documents == 3 and ds.num_tokens == 13
    assert [b.tolist() for b in ds] == expected_blocks()
    assert ds.sizes.tolist() == [3, 2, 1, 2, 2, 3]
    assert ds.doc_index.tolist() == [0, 2, 3, 6]
    assert [ds.document(k).tolist() for k in range(3)] == [ids for ids, _ in DOCS]
    assert ds[-1].tolist() == [15, 16, 17]
    assert ds.meta["max_seq_len"] == 10 and ds.meta["build_id"] == meta["build_id"]
    assert ds.meta["dtype"] == "uint16" and ds[0].dtype == np.uint16
    with pytest.raises(IndexError):
        ds[6]
    # Opening via the .idx name is the same dataset.
    assert IndexedDataset(str(tmp_path / "d.idx"))[2].tolist() == [10]


def test_items_are_zero_copy_read_only_views(tmp_path):
    write_docs(tmp_path / "d")
    ds = IndexedDataset(str(tmp_path / "d"))
    block = ds[3]
    assert np.shares_memory(block, ds[3])  # two reads see the same memory: no copy was made
    assert np.shares_memory(ds.document(2), ds[4])  # a document view overlaps its blocks
    assert not block.flags.owndata and not block.flags.writeable
    with pytest.raises(ValueError):
        block[0] = 1


def test_int32_path_keeps_large_ids_and_uint16_refuses_them(tmp_path):
    docs = [([70_000, 1, 65_535, 123_456], [4])]
    write_docs(tmp_path / "big", docs, dtype=np.int32)
    ds = IndexedDataset(str(tmp_path / "big"))
    assert ds[0].dtype == np.int32 and ds[0].tolist() == [70_000, 1, 65_535, 123_456]
    assert os.path.getsize(tmp_path / "big.bin") == 16
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_docs(tmp_path / "small", docs, dtype=np.uint16)
    assert not list(tmp_path.glob("small*"))  # the failed writer left nothing behind


def test_dtype_choice_follows_vocab_size():
    assert choose_dtype(30_522) == np.uint16
    assert choose_dtype(65_500) == np.uint16
    assert choose_dtype(65_501) == np.int32
    assert choose_dtype(250_002) == np.int32


def test_writer_is_atomic(tmp_path):
    prefix = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(prefix), np.uint16) as writer:
            writer.add_document([1, 2], [2])
            raise RuntimeError("killed")
    assert not list(tmp_path.iterdir())
    # A run that died without cleaning up (e.g. SIGKILL) leaves only .partial files, which don't open.
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    writer.add_document([1, 2], [2])
    writer._bin.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin.partial"]
    with pytest.raises(UserError, match="interrupted prepare"):
        IndexedDataset(str(prefix))
    writer.abort()


def test_writer_rejects_inconsistent_documents(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        with pytest.raises(ValueError):
            writer.add_document([1, 2, 3], [2])
        with pytest.raises(ValueError):
            writer.add_document([1, 2], [2, 0])
        with pytest.raises(ValueError):
            writer.add_documents([1, 2], [1, 1], [1, 0, 1])


def damage(path, offset=None, data=None, truncate=None):
    with open(path, "r+b") as f:
        if truncate is not None:
            f.truncate(truncate)
        else:
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("case, pattern", [
    ("truncated_bin", "truncated or corrupt"),
    ("truncated_idx", "truncated or corrupt"),
    ("short_idx", "shorter than the 64-byte header"),
    ("bad_magic", "wrong magic"),
    ("bad_version", "format version 7"),
    ("bad_dtype", "unknown dtype code"),
    ("bad_sizes", "sum to"),
    ("bad_pointers", "pointers disagree"),
    ("bad_doc_index", "document index"),
    ("missing_bin", "missing"),
    ("missing_json", "missing"),
    ("bad_json", "not valid JSON"),
    ("mixed_runs", "different prepare runs"),
    ("json_counts", "num_tokens is 99"),
])
def test_damaged_datasets_fail_with_a_clear_error(tmp_path, case, pattern):
    prefix = tmp_path / "d"
    write_docs(prefix)
    idx, bin_, js = (str(prefix) + ext for ext in (".idx", ".bin", ".json"))
    nb, nd = 6, 3
    sizes_at = 64 + 8 * nb + 8 * (nd + 1)
    if case == "truncated_bin":
        damage(bin_, truncate=20)
    elif case == "truncated_idx":
        damage(idx, truncate=os.path.getsize(idx) - 4)
    elif case == "short_idx":
        damage(idx, truncate=10)
    elif case == "bad_magic":
        damage(idx, 0, b"MMIDIDX\x00")
    elif case == "bad_version":
        damage(idx, 8, np.uint32(7).tobytes())
    elif case == "bad_dtype":
        damage(idx, 12, np.uint32(9).tobytes())
    elif case == "bad_sizes":
        damage(idx, sizes_at, np.int32(4).tobytes())
    elif case == "bad_pointers":
        damage(idx, 64 + 8, np.int64(2).tobytes())
    elif case == "bad_doc_index":
        damage(idx, 64 + 8 * nb + 8, np.int64(5).tobytes() + np.int64(4).tobytes())
    elif case == "missing_bin":
        os.remove(bin_)
    elif case == "missing_json":
        os.remove(js)
    elif case == "bad_json":
        damage(js, 0, b"{{{{")
    elif case == "mixed_runs":
        other = tmp_path / "other"
        write_docs(other)
        os.replace(str(other) + ".json", js)
    elif case == "json_counts":
        meta = json.load(open(js))
        meta["num_tokens"] = 99
        json.dump(meta, open(js, "w"))
    with pytest.raises(UserError, match=pattern) as err:
        IndexedDataset(str(prefix))
    assert "prepare" in str(err.value)  # the message says how to rebuild


def test_missing_dataset_says_how_to_create_one(tmp_path):
    with pytest.raises(UserError, match="retromae-ds prepare"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_pickle_reopens_the_files(tmp_path):
    write_docs(tmp_path / "d")
    ds = IndexedDataset(str(tmp_path / "d"))
    clone = pickle.loads(pickle.dumps(ds))
    assert [b.tolist() for b in clone] == expected_blocks()


def test_block_subset(tmp_path):
    write_docs(tmp_path / "d")
    ds = IndexedDataset(str(tmp_path / "d"))
    held_out = BlockSubset(ds, int(ds.doc_index[-2]), len(ds))  # the last document
    assert len(held_out) == 3
    assert [b.tolist() for b in held_out] == [[11, 12], [13, 14], [15, 16, 17]]
    assert held_out.sizes.tolist() == [2, 2, 3] and held_out[-1].tolist() == [15, 16, 17]
    with pytest.raises(IndexError):
        held_out[3]
    with pytest.raises(ValueError):
        BlockSubset(ds, 4, 7)


class Numbers:
    """A stand-in dataset whose items name themselves."""

    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.name, i)


def test_blend_proportions_determinism_and_coverage():
    a, b, c = Numbers("a", 50), Numbers("b", 30), Numbers("c", 7)
    blend = BlendedDataset([a, b, c], [0.5, 0.3, 0.2], seed=1, size=1000)
    assert len(blend) == 87 and blend.samples_per_epoch == 1000  # ids address blocks; epochs hold 1000
    items = [blend[int(i)] for i in blend.epoch_samples(0)]
    counts = {name: sum(1 for n, _ in items if n == name) for name in "abc"}
    assert counts == {"a": 500, "b": 300, "c": 200}
    # Up-sampled c walks all 7 blocks evenly.
    c_items = [i for n, i in items if n == "c"]
    assert sorted(set(c_items)) == list(range(7))
    assert max(c_items.count(i) for i in range(7)) - min(c_items.count(i) for i in range(7)) <= 1
    again = BlendedDataset([a, b, c], [0.5, 0.3, 0.2], seed=1, size=1000)
    assert [again[int(i)] for i in again.epoch_samples(0)] == items
    other = BlendedDataset([a, b, c], [0.5, 0.3, 0.2], seed=2, size=1000)
    assert [other[int(i)] for i in other.epoch_samples(0)] != items
    # Positions can be asked for one by one: the same ids as the whole epoch.
    assert blend.epoch_samples(3, [999, 0, 500]).tolist() == blend.epoch_samples(3)[[999, 0, 500]].tolist()


def test_blend_default_size_and_errors():
    a, b = Numbers("a", 10), Numbers("b", 20)
    blend = BlendedDataset([a, b], [1, 1], seed=0)
    assert len(blend) == 30 and blend.samples_per_epoch == 30
    assert blend[0] == ("a", 0) and blend[10] == ("b", 0) and blend[-1] == ("b", 19)
    with pytest.raises(IndexError):
        blend[30]
    with pytest.raises(UserError):
        BlendedDataset([a, b], [1], seed=0)
    assert not hasattr(blend, "sizes")  # Numbers has no sizes
    with pytest.raises(UserError):
        BlendedDataset([a, b], [-1, 2], seed=0)
    with pytest.raises(UserError):
        BlendedDataset([a, Numbers("e", 0)], [1, 1], seed=0)
    # A weight-0 dataset (even an empty one) gets no samples.
    zero = BlendedDataset([a, Numbers("e", 0), b], [1, 0, 2], seed=0, size=7)
    assert zero.counts.tolist() == [2, 0, 5] and {zero[int(i)][0] for i in zero.epoch_samples(0)} == {"a", "b"}


def test_tokenizer_fingerprint_is_stable_across_processes(minilm_tokenizer, minilm_tokenizer_dir):
    fp = tokenizer_fingerprint(minilm_tokenizer)
    assert fp["vocab_size"] == 30522
    assert (fp["cls_token_id"], fp["sep_token_id"], fp["pad_token_id"], fp["mask_token_id"]) == (101, 102, 0, 103)
    code = ("import json,sys; from transformers import AutoTokenizer; "
            "from retromae_ds.data.indexed import tokenizer_fingerprint; "
            "print(json.dumps(tokenizer_fingerprint(AutoTokenizer.from_pretrained(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, minilm_tokenizer_dir], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == fp


def test_tokenizer_mismatch_is_a_clear_error(tmp_path, minilm_tokenizer, sentencepiece_tokenizer):
    write_docs(tmp_path / "d", meta={"tokenizer": tokenizer_fingerprint(minilm_tokenizer)})
    ds = IndexedDataset(str(tmp_path / "d"))
    check_tokenizer_matches(ds.meta, minilm_tokenizer, ds.prefix)  # same tokenizer: fine
    with pytest.raises(UserError) as err:
        check_tokenizer_matches(ds.meta, sentencepiece_tokenizer, ds.prefix)
    message = str(err.value)
    assert "BertTokenizer" in message and "XLMRobertaTokenizer" in message and "vocab_hash" in message
    assert "retromae-ds prepare --tokenizer" in message
    changed = dict(ds.meta["tokenizer"], mask_token_id=4)
    with pytest.raises(UserError, match="mask_token_id 4 vs 103"):
        check_tokenizer_matches(changed, minilm_tokenizer, ds.prefix)


def test_blend_of_indexed_datasets_has_sizes(tmp_path):
    write_docs(tmp_path / "a")
    write_docs(tmp_path / "b", [([1, 2, 3, 4], [4]), ([5], [1])])
    a, b = IndexedDataset(str(tmp_path / "a")), IndexedDataset(str(tmp_path / "b"))
    blend = BlendedDataset([a, b], [2, 1], seed=3, size=30)
    assert blend.sizes.tolist() == [len(blend[i]) for i in range(len(blend))]
    assert sorted({tuple(blend[int(i)].tolist()) for i in blend.epoch_samples(0)}) == sorted(
        {tuple(x) for x in expected_blocks() + [[1, 2, 3, 4], [5]]})


# --------------------------------------------------------------------------------------------------
# the open-time check runs in chunks: every corruption is still caught wherever it lies, in bounded memory


def many_docs(n_docs=20, seed=0):
    """Documents of 1-3 blocks of 1-3 ids each (about 40 blocks): many chunks of 4 blocks."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sizes = rng.integers(1, 4, rng.integers(1, 4)).tolist()
        docs.append((rng.integers(5, 100, sum(sizes)).tolist(), sizes))
    return docs


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 1 << 20])
def test_chunked_check_accepts_a_sound_index(tmp_path, monkeypatch, chunk):
    from retromae_ds.data import indexed

    monkeypatch.setattr(indexed, "CHECK_CHUNK_BLOCKS", chunk)
    docs = many_docs()
    write_docs(tmp_path / "d", docs)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert [b.tolist() for b in ds] == expected_blocks(docs)


@pytest.mark.parametrize("case, pattern", [
    ("empty_block", "a block has no ids"),
    ("negative_block", "a block has no ids"),
    ("grown_block", r"block sizes sum to {sum_plus_1}, header says {sum} ids"),  # reported before the pointers
    ("grown_last_block", r"block sizes sum to {sum_plus_1}, header says {sum} ids"),
    ("bad_pointer", "block pointers disagree with block sizes"),
    ("bad_pointer_at_chunk_start", "block pointers disagree with block sizes"),
    ("bad_last_pointer", "block pointers disagree with block sizes"),
    ("doc_index_repeats", "document index is not increasing"),
    ("doc_index_repeats_across_chunks", "document index is not increasing"),
    ("doc_index_decreases", "document index is not increasing"),
    ("doc_index_wrong_end", "document index is not increasing"),
])
def test_corruption_in_a_later_chunk_is_caught(tmp_path, monkeypatch, case, pattern):
    """The check reads CHECK_CHUNK_BLOCKS blocks at a time; with chunks of 4, each corruption sits in a
    late chunk (at its start, middle or end) and gives the same error as for the whole index at once."""
    from retromae_ds.data import indexed

    monkeypatch.setattr(indexed, "CHECK_CHUNK_BLOCKS", 4)
    prefix = tmp_path / "d"
    docs = many_docs()
    write_docs(prefix, docs)
    nb, nd = sum(len(s) for _, s in docs), len(docs)
    total = sum(sum(s) for _, s in docs)
    assert nb > 30 and nd > 16
    idx = str(prefix) + ".idx"
    pointers_at, doc_at = 64, 64 + 8 * nb
    sizes_at = doc_at + 8 * (nd + 1)
    sizes = np.fromfile(idx, np.int32, nb, offset=sizes_at)
    doc_index = np.fromfile(idx, np.int64, nd + 1, offset=doc_at)
    late = 4 * 6 + 2                                         # the middle of chunk 6
    if case == "empty_block":
        damage(idx, sizes_at + 4 * late, np.int32(0).tobytes())
    elif case == "negative_block":
        damage(idx, sizes_at + 4 * late, np.int32(-3).tobytes())
    elif case == "grown_block":
        damage(idx, sizes_at + 4 * late, np.int32(sizes[late] + 1).tobytes())
    elif case == "grown_last_block":                         # moves no pointer: only the sum tells
        damage(idx, sizes_at + 4 * (nb - 1), np.int32(sizes[-1] + 1).tobytes())
    elif case == "bad_pointer":
        damage(idx, pointers_at + 8 * late, np.int64(2).tobytes())
    elif case == "bad_pointer_at_chunk_start":               # the running offset carried into chunk 5
        pointer = np.fromfile(idx, np.int64, 1, offset=pointers_at + 8 * 20)[0]
        damage(idx, pointers_at + 8 * 20, np.int64(pointer + 2).tobytes())
    elif case == "bad_last_pointer":
        pointer = np.fromfile(idx, np.int64, 1, offset=pointers_at + 8 * (nb - 1))[0]
        damage(idx, pointers_at + 8 * (nb - 1), np.int64(pointer - 2).tobytes())
    elif case == "doc_index_repeats":
        damage(idx, doc_at + 8 * 14, doc_index[13].tobytes())
    elif case == "doc_index_repeats_across_chunks":          # entries 15 and 16 sit in chunks 3 and 4
        damage(idx, doc_at + 8 * 16, doc_index[15].tobytes())
    elif case == "doc_index_decreases":
        damage(idx, doc_at + 8 * 14, np.int64(doc_index[13] - 1).tobytes())
    elif case == "doc_index_wrong_end":
        damage(idx, doc_at + 8 * nd, np.int64(nb + 1).tobytes())
    with pytest.raises(UserError, match=pattern.format(sum=total, sum_plus_1=total + 1)) as err:
        IndexedDataset(str(prefix))
    assert "prepare" in str(err.value)


def test_open_time_check_allocates_a_bounded_amount(tmp_path, monkeypatch):
    """The check's temporaries are bounded by the chunk (~9 bytes per block of it: one int64 offset
    buffer and a comparison mask), whatever the index's size; the whole index at once took ~25 bytes per
    block (75 MB here, 2.5 GB per rank at 100M blocks). numpy's buffers are traced by tracemalloc."""
    import tracemalloc

    from retromae_ds.data import indexed

    rng = np.random.default_rng(0)
    blocks, chunk = 3_000_000, 1 << 16
    sizes = rng.integers(1, 3, blocks)
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as writer:
        writer.add_documents(np.zeros(int(sizes.sum()), np.uint16), sizes, np.full(blocks // 3, 3))
        writer.finalize({})
    monkeypatch.setattr(indexed, "CHECK_CHUNK_BLOCKS", chunk)
    ds = IndexedDataset(str(tmp_path / "d"))
    tracemalloc.start()
    try:
        ds._check_arrays()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * chunk, f"{peak / 2**20:.1f} MB for {blocks:,} blocks in chunks of {chunk:,}"

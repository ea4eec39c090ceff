"""`prepare` on a disk that fills up: exit code 2 with one paragraph naming the file, and no file left.

The disk is real: a tiny tmpfs mounted for the test (CI runs as root). Where mounting is not
permitted the tests are skipped, saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.corpora import lee_articles, write_jsonl
from retromae_ds.data.indexed import IndexedDataset, IndexedDatasetWriter
from retromae_ds.data.prepare import prepare_files
from retromae_ds.errors import UserError

PAGE = 4096  # tmpfs allocates whole pages


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root; CI runs as root")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no `mount` command to create a small tmpfs (a real full disk)")
    if done.returncode:
        pytest.skip(f"mounting a small tmpfs is not permitted here ({done.stderr.strip()}); "
                    f"the disk-full tests need a real full disk")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def free_bytes(folder) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def leave_free(folder, n_pages: int) -> None:
    """Fill the disk holding ``folder`` until exactly ``n_pages`` pages are free."""
    fill = free_bytes(folder) - n_pages * PAGE
    assert fill >= 0, "the disk is too small for this case"
    with open(os.path.join(folder, "filler"), "wb") as f:
        f.write(b"\0" * fill)
    assert free_bytes(folder) == n_pages * PAGE


def test_disk_full_while_writing_token_ids_exits_2_and_leaves_nothing(tmp_path, small_disk, minilm_tokenizer_dir):
    corpus = write_jsonl(tmp_path / "lee.jsonl", [{"text": t} for t in lee_articles(300)])  # ~146 KB of ids
    out_dir = small_disk / "out"
    result = subprocess.run([sys.executable, "-m", "retromae_ds.cli", "prepare", "--input", corpus, "--tokenizer",
                             minilm_tokenizer_dir, "--output", str(out_dir / "lee"), "--num-proc", "2",
                             "--no-progress"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and "\n" not in message  # one paragraph
    assert f"could not write {out_dir / 'lee.bin.partial'} (the token ids" in message
    assert "No space left on device" in message and f"df -h {out_dir}" in message
    assert "choose another --output" in message
    assert os.listdir(out_dir) == []  # no partial file, nothing that looks like a dataset
    assert free_bytes(small_disk) == 64 * 1024  # and the space is given back


def prepare_lee(prefix, **kw) -> dict:
    return prepare_files([kw.pop("corpus")], kw.pop("tokenizer"), str(prefix), max_seq_len=64, num_proc=1,
                         progress=False, **kw)


@pytest.mark.parametrize("full_at", ["idx", "json"])
def test_disk_full_while_writing_the_index_or_metadata(tmp_path, small_disk, minilm_tokenizer_dir, full_at):
    corpus = write_jsonl(tmp_path / "lee.jsonl", [{"text": t} for t in lee_articles(60)])
    prepare_lee(tmp_path / "ref", corpus=corpus, tokenizer=minilm_tokenizer_dir)  # to learn the file sizes
    need = {ext: pages(os.path.getsize(tmp_path / f"ref.{ext}")) for ext in ("bin", "idx", "json")}
    assert need["idx"] >= 2  # so that the index can be cut short
    out_dir = small_disk / "out"
    out_dir.mkdir()
    leave_free(small_disk, need["bin"] + (need["idx"] - 1 if full_at == "idx" else need["idx"]))
    with pytest.raises(UserError) as err:
        prepare_lee(out_dir / "lee", corpus=corpus, tokenizer=minilm_tokenizer_dir)
    message = str(err.value)
    what = {"idx": "the block index", "json": "the metadata"}[full_at]
    assert f"could not write {out_dir / ('lee.' + full_at + '.partial')} ({what}" in message
    assert "No space left on device" in message and "choose another --output" in message
    assert os.listdir(out_dir) == []


def test_a_failed_overwrite_keeps_the_previous_dataset(tmp_path, small_disk, minilm_tokenizer_dir):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": t} for t in lee_articles(5)])
    large = write_jsonl(tmp_path / "large.jsonl", [{"text": t} for t in lee_articles(60)])
    prefix = small_disk / "lee"
    prepare_lee(prefix, corpus=small, tokenizer=minilm_tokenizer_dir)
    before = {name: (small_disk / name).read_bytes() for name in ("lee.bin", "lee.idx", "lee.json")}
    prepare_lee(tmp_path / "ref", corpus=large, tokenizer=minilm_tokenizer_dir)
    need = sum(pages(os.path.getsize(tmp_path / f"ref.{ext}")) for ext in ("bin", "idx"))
    leave_free(small_disk, need)  # the new metadata does not fit
    with pytest.raises(UserError, match="lee.json.partial"):
        prepare_lee(prefix, corpus=large, tokenizer=minilm_tokenizer_dir, overwrite=True)
    assert sorted(os.listdir(small_disk)) == ["filler", "lee.bin", "lee.idx", "lee.json"]
    assert {name: (small_disk / name).read_bytes() for name in before} == before
    assert IndexedDataset(str(prefix)).num_documents == 5


def test_the_writer_cleans_up_when_buffered_ids_cannot_be_flushed(small_disk):
    """Small documents wait in the file buffer, so closing the file after the failure fails again."""
    leave_free(small_disk, 1)
    out_dir = small_disk / "out"
    writer = IndexedDatasetWriter(str(out_dir / "x"), np.uint16)
    with pytest.raises(UserError, match="x.bin.partial"):
        with writer:
            for _ in range(100):
                writer.add_document(np.arange(100), [100])
    assert os.listdir(out_dir) == []

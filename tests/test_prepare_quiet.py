"""`prepare` tokenizes whole documents on purpose, so transformers' "Token indices sequence length is
longer than the specified maximum" warning must not appear, from the main process or any worker,
while the caller's tokenizer keeps its limit (and its warning) for other uses."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.corpora import lee_articles, write_jsonl

WARNING = "Token indices sequence length is longer than the specified maximum sequence length"

SCRIPT = r"""
import sys
from transformers import AutoTokenizer
from retromae_ds.data.prepare import prepare_corpus, prepare_files

corpus, tokenizer_dir, out, long_text = sys.argv[1:5]
for num_proc in (1, 2):
    prepare_files([corpus], tokenizer_dir, f"{out}_{num_proc}", max_seq_len=64, num_proc=num_proc, progress=False)


class Reader:
    sources, skipped_bad_records = [], 0

    def batches(self):
        yield [long_text] * 3


tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
prepare_corpus(Reader(), tokenizer, f"{out}_object", 64, 1, {}, progress=False)
print("PREPARED", file=sys.stderr, flush=True)
assert tokenizer.model_max_length == 512, tokenizer.model_max_length
tokenizer([long_text], add_special_tokens=False)  # the caller's tokenizer still has its limit
"""


def test_no_sequence_length_warning_from_any_process(tmp_path, minilm_tokenizer_dir, minilm_tokenizer):
    long_text = " ".join(lee_articles(6))
    assert len(minilm_tokenizer(long_text, add_special_tokens=False)["input_ids"]) > 1000  # beyond 512
    corpus = write_jsonl(tmp_path / "long.jsonl", [{"text": long_text}] * 8)
    result = subprocess.run([sys.executable, "-c", SCRIPT, corpus, minilm_tokenizer_dir, str(tmp_path / "out"),
                             long_text], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    during, after = result.stderr.split("PREPARED")
    assert WARNING not in during + result.stdout
    assert after.count(WARNING) == 1  # the check can see the warning: it is printed where it belongs

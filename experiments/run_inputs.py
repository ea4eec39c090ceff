"""What every run of a sweep starts from: the tokenizer, the prepared data and, from random init, the model config.

With --corpus / --train-tokenizer (the scratch preset) a raw corpus is turned into a tokenizer and prepared
data under OUT_DIR, each step stamped with its settings and inputs so that --reuse can skip it; the runs then
all read the same files, which is what makes one seed's runs comparable across objectives.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def write_model_config(folder: Path, hidden: int, layers: int, heads: int, intermediate: int,
                       vocab_size: int = 30522, pad_token_id: int = 0) -> Path:
    """A small random-init BERT config for --model-config (default: MiniLM's uncased vocabulary; a
    vocabulary trained by --train-tokenizer passes its size and pad id)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": 512, "type_vocab_size": 2,
        "pad_token_id": pad_token_id}, indent=1))
    return folder


# ------------------------------------------------------------------------------------------------
# Preparing a raw corpus (--corpus / --train-tokenizer; the scratch preset): tokenizer, then data
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PrepStep:
    """One preparation step: `argv` of `retromae-ds` (None: done in this process, see run_prep), what it
    writes (`output`), the `stamp` (its settings and inputs) saved next to it when it succeeds, and whether
    the output of an earlier run with the same stamp is reused (`cached`: only with --reuse)."""

    name: str
    argv: list | None
    output: Path
    stamp: dict
    cached: bool = False
    seconds: float | None = None

    def command(self) -> str:
        return "retromae-ds " + " ".join(self.argv) if self.argv else f"(in process) {self.name}"


def scratch_paths(out_root: Path, max_seq_len: int) -> dict[str, Path]:
    """Where the preparation steps write, under OUT_DIR (so a rerun with --reuse finds them); absolute,
    since the runs start in the repository root."""
    out_root = Path(out_root).resolve()
    return {"demo_corpus": out_root / "corpus" / "demo.jsonl", "tokenizer": out_root / "tokenizer",
            "data": out_root / "data" / f"corpus_{max_seq_len}", "stamps": out_root / "stamps"}


def input_fingerprint(paths: list[str]) -> list:
    """[path, files, bytes, newest mtime] per input (a folder: all files under it): a rerun with --reuse
    prepares again when an input changed."""
    rows = []
    for p in paths:
        path = Path(p).resolve()
        files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path] if path.exists() else []
        stats = [f.stat() for f in files]
        rows.append([str(path), len(stats), sum(s.st_size for s in stats),
                     max((s.st_mtime_ns for s in stats), default=0)])
    return rows


def _stamp_path(paths: dict, step: PrepStep) -> Path:
    return paths["stamps"] / f"{step.name}.json"


def _output_complete(step: PrepStep) -> bool:
    if step.name == "tokenizer":
        return (step.output / "tokenizer.json").exists()
    if step.name == "prepare":
        return Path(str(step.output) + ".idx").exists() and Path(str(step.output) + ".json").exists()
    return step.output.exists()


def scratch_plan(args, out_root: Path) -> list[PrepStep]:
    """The preparation steps for --corpus / --train-tokenizer, each marked cached or not.

    - demo_corpus (no --corpus): the demo corpus (gensim's Wikipedia sample + Lee news, in the order of
      `prepare --demo`) written once as OUT_DIR/corpus/demo.jsonl; `prepare --demo` only takes the MiniLM
      tokenizer, so the demo text goes through the same `--input` path as a user's corpus;
    - tokenizer (--train-tokenizer ALGO): `retromae-ds tokenizer` of --vocab-size on the corpus -> OUT_DIR/tokenizer;
    - prepare: `retromae-ds prepare` of the corpus with that tokenizer (else the run's: --model's or MiniLM's)
      at --max-seq-len -> OUT_DIR/data/corpus_<len>.
    With --reuse a step is skipped when its output exists and its stamp (settings + input sizes and mtimes)
    matches the one saved when it last succeeded; once a step runs, every later step runs too."""
    paths = scratch_paths(out_root, args.max_seq_len)
    steps = []
    if args.corpus:
        inputs = [str(Path(p).resolve()) for p in args.corpus]
    else:
        inputs = [str(paths["demo_corpus"])]
        steps.append(PrepStep("demo_corpus", None, paths["demo_corpus"], {"corpus": "demo"}))
    prep_inputs = {"inputs": inputs, "fingerprint": input_fingerprint(args.corpus) if args.corpus else "demo"}
    if args.train_tokenizer:
        tokenizer = str(paths["tokenizer"])
        argv = ["tokenizer", "--input", *inputs, "--algorithm", args.train_tokenizer, "--vocab-size",
                str(args.vocab_size), "--text-field", args.text_field, "--output", tokenizer, "--overwrite",
                "--no-progress"]
        steps.append(PrepStep("tokenizer", argv, paths["tokenizer"], {"argv": argv, **prep_inputs}))
    else:
        tokenizer = run_tokenizer(args)
    argv = ["prepare", "--input", *inputs, "--tokenizer", tokenizer, "--output", str(paths["data"]),
            "--max-seq-len", str(args.max_seq_len), "--text-field", args.text_field, "--overwrite", "--no-progress"]
    steps.append(PrepStep("prepare", argv, paths["data"], {"argv": argv, **prep_inputs}))
    fresh = not args.reuse
    for step in steps:
        if not fresh:
            saved = _stamp_path(paths, step)
            step.cached = (_output_complete(step) and saved.exists()
                           and json.loads(saved.read_text()) == json.loads(json.dumps(step.stamp)))
            fresh = not step.cached
    return steps


def write_demo_corpus(path: Path) -> None:
    """The demo corpus as JSON lines ({"text": ...}), in the order `prepare --demo` reads it."""
    from retromae_ds.data.readers import DemoReader

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for batch in DemoReader().batches():
            for text in batch:
                f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def run_prep(steps: list[PrepStep], out_root: Path, args) -> bool:
    """Run the steps that are not cached (in this process: `retromae_ds.cli.main`), saving each stamp after
    it succeeds; returns True when any step ran (the data may have changed: runs are then not reused)."""
    from retromae_ds.cli import main as cli

    paths = scratch_paths(out_root, args.max_seq_len)
    ran = False
    for step in steps:
        if step.cached:
            print(f"  {step.name}: reused {step.output}", file=sys.stderr, flush=True)
            continue
        stamp = _stamp_path(paths, step)
        stamp.unlink(missing_ok=True)  # a failed step leaves no stamp behind
        t0 = time.monotonic()
        if step.argv is None:
            write_demo_corpus(step.output)
        elif cli(list(step.argv)) != 0:
            raise SystemExit(f"preparation step {step.name} failed: {step.command()}")
        step.seconds = round(time.monotonic() - t0, 1)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(step.stamp, indent=1) + "\n")
        print(f"  {step.name}: {step.seconds:.0f} s ({step.command()})", file=sys.stderr, flush=True)
        ran = True
    return ran


# ------------------------------------------------------------------------------------------------
# The tokenizer and the random-init model config the runs are given
# ------------------------------------------------------------------------------------------------

def run_tokenizer(args) -> str:
    """The tokenizer the runs use: the trained one, --model's, or the bundled MiniLM's."""
    from retromae_ds.data.demo_corpus import minilm_path

    if args.train_tokenizer:
        return str(scratch_paths(Path(args.out_dir), args.max_seq_len)["tokenizer"])
    return args.model or minilm_path()


def random_init_config(args, out_root: Path, tokenizer: str):
    """What the runs pass as --model-config: a preset name (or an HF config path, made absolute: the runs
    start in the repository root), else a BERT of --hidden/--layers/--heads written to OUT_DIR/model_config
    (vocabulary size and pad id from a trained tokenizer; MiniLM's otherwise)."""
    if args.model_config:
        path = Path(args.model_config)
        return str(path.resolve()) if path.exists() else args.model_config
    vocab = {}
    if args.train_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        vocab = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    return write_model_config(out_root / "model_config", args.hidden, args.layers, args.heads,
                              args.intermediate or 4 * args.hidden, **vocab)


def model_config_report(model_cfg, tokenizer: str, args) -> dict:
    """The random-init encoder's config as the runs build it (a preset resolved for the tokenizer and the
    data's block length, as retromae_ds/engine/build.py does)."""
    from retromae_ds.model import presets

    path = Path(model_cfg)
    if path.exists():
        return json.loads((path / "config.json" if path.is_dir() else path).read_text())
    from transformers import AutoTokenizer

    from retromae_ds.data.indexed import IndexedDataset

    length = IndexedDataset(args.data).meta["max_seq_len"]
    config = presets.preset_config(str(model_cfg), AutoTokenizer.from_pretrained(tokenizer), length)
    return {"preset": str(model_cfg), **config.to_diff_dict()}

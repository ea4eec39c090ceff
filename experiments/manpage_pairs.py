"""A real query-passage retrieval set from the manual pages installed on this machine (Debian's manpages).

Each page (sections 1-8) gives one pair: its NAME line's description ("ls - list directory contents"
gives "list directory contents") is the query, its DESCRIPTION section (the first --passage-words words) the
passage. The text is written by the programs' authors, not cut from any pre-training corpus here, and
the task is a retriever's: find the page that does what the query says. Pages are split by a hash of
their name, so the split does not depend on which other pages are installed:

    python -m experiments.manpage_pairs --out data/manpages            # train.jsonl, eval.jsonl, info.json

Pages that are only a link (``.so other``), that lack NAME or DESCRIPTION, whose description or passage is
too short, or whose query or passage text repeats an earlier page's (a program's aliases) are left out.
The roff markup (man and mdoc macros, font and character escapes) is removed by the small reader below:
good enough for running text, not a general roff renderer.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
from pathlib import Path

MAN_DIRS = tuple(f"/usr/share/man/man{section}" for section in "12345678")
# The Google Cloud SDK installs ~16,600 generated pages (gcloud_*), templated text of one tool that would
# outnumber every other page two to one; they are left out.
SKIP_PREFIXES = ("gcloud_", "gcloud.", "bq.", "gsutil.")
ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\([A-Za-z]{2}|.)"), ""),   # font changes \fB \f(CW \f[BI]
    (re.compile(r"\\s[+-]?\d"), ""),                        # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),            # strings \*(Tm \*[x]
    (re.compile(r"\\\((em|en)"), " - "),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\((bu|ci)"), ""),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),                # other named characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%:)]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r'\\".*$'), ""),                              # a comment at the end of a line
    (re.compile(r"\\(.)"), r"\1"),
]
TEXT_MACROS = {"B", "I", "BR", "BI", "IR", "RB", "IB", "RI", "SM", "SB", "Nm", "Nd", "Ar", "Fl", "Cm", "Pa",
               "Ic", "Xr", "Em", "Sy", "Li", "Dq", "Sq", "Ql", "Va", "Ev", "Op", "Ql", "Nx", "Fx", "Ox", "Bx"}


def unescape(text: str) -> str:
    for pattern, replacement in ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def macro_text(name: str, args: str) -> str:
    """The words a text macro prints (quotes dropped; mdoc's Fl gets its dash back)."""
    words = [w.strip('"') for w in re.findall(r'"[^"]*"|\S+', args)]
    if name == "Fl":
        return " ".join("-" + w for w in words[:1]) + (" " + " ".join(words[1:]) if words[1:] else "")
    if name == "Nd":  # mdoc's one-line description: the dash man pages write by hand
        return "- " + " ".join(words)
    if name in ("BR", "BI", "IR", "RB", "IB", "RI"):
        return "".join(words)
    return " ".join(words)


def sections(source: str) -> dict[str, str]:
    """{SECTION NAME: its text} of a man or mdoc page (upper-case section names)."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '.\\#')) or line in (".", "'"):
            continue
        m = re.match(r"^[.'](SH|Sh)\s*(.*)$", line)
        if m:
            current = unescape(m.group(2)).strip().strip('"').upper()
            out.setdefault(current, [])
            continue
        if current is None:
            continue
        m = re.match(r"^[.']\s*([A-Za-z]{1,3})\b\s*(.*)$", line)
        if m:
            name, args = m.group(1), m.group(2)
            if name in TEXT_MACROS:
                out[current].append(unescape(macro_text(name, args)))
            elif name in ("PP", "LP", "P", "TP", "IP", "sp", "br", "Pp", "It"):
                out[current].append("\n")
                if name in ("IP", "It") and args:
                    out[current].append(unescape(macro_text("B", args)))
            continue
        out[current].append(unescape(line))
    return {name: re.sub(r"[ \t]+", " ", " ".join(parts)).strip() for name, parts in out.items()}


def page_pair(path: Path, passage_words: int) -> dict | None:
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.suffix == ".gz" else open(
                path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except (OSError, EOFError):
        return None
    if source.lstrip().startswith(".so "):
        return None
    parts = sections(source)
    name, description = parts.get("NAME", ""), parts.get("DESCRIPTION", "")
    # "ls - list directory contents", "cp, mv - copy": the query is what follows the dash
    m = re.match(r"^(.*?)\s+[-\u2013\u2014]+\s+(.*)$", name.replace("\n", " "))
    if not m:
        return None
    query = " ".join(m.group(2).split())
    words = description.split()
    if len(query.split()) < 3 or len(words) < 20:
        return None
    return {"page": path.name.split(".")[0], "query": query, "passage": " ".join(words[:passage_words])}


def in_eval(page: str, eval_share: float) -> bool:
    digest = hashlib.blake2b(page.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < eval_share


def build(out: Path, *, eval_share: float, passage_words: int, max_eval: int) -> dict:
    pages = sorted(p for d in MAN_DIRS if os.path.isdir(d) for p in Path(d).iterdir()
                   if p.is_file() and not p.name.startswith(SKIP_PREFIXES))
    seen, split = set(), {"train": [], "eval": []}
    for path in pages:
        pair = page_pair(path, passage_words)
        if pair is None or pair["query"] in seen or pair["passage"] in seen:
            continue
        seen.update((pair["query"], pair["passage"]))
        split["eval" if in_eval(pair["page"], eval_share) else "train"].append(pair)
    split["eval"] = split["eval"][:max_eval]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in split.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {"pages_read": len(pages), "train": len(split["train"]), "eval": len(split["eval"]),
            "eval_share": eval_share, "passage_words": passage_words, "sources": list(MAN_DIRS)}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/manpages", help="folder for train.jsonl, eval.jsonl, info.json")
    ap.add_argument("--eval-share", type=float, default=0.35, help="share of pages (by name hash) for eval")
    ap.add_argument("--passage-words", type=int, default=120, help="words of DESCRIPTION kept as the passage")
    ap.add_argument("--max-eval", type=int, default=2000, help="at most this many eval pairs")
    args = ap.parse_args(argv)
    info = build(Path(args.out), eval_share=args.eval_share, passage_words=args.passage_words,
                 max_eval=args.max_eval)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

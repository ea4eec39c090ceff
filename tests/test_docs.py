"""The docs stay true to the code: the generated flag table, the README's two commands, relative links."""

from __future__ import annotations

import json
import re
from pathlib import Path

from retromae_ds.flag_table import flag_table_markdown

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
START, END = "<!-- flag-table:start -->\n", "<!-- flag-table:end -->"
DEMO_COMMAND = 'pip install torch==2.13.0 -e ".[demo]" && deepspeed launch/pretrain.py --deepspeed ds_configs/zero2.json'
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_flag_table_matches_the_config_help_texts():
    text = (DOCS / "training.md").read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "docs/training.md needs one pair of flag-table markers"
    table = text.split(START, 1)[1].split(END, 1)[0]
    assert table == flag_table_markdown(), (
        "the flag table in docs/training.md differs from the config's help texts: run "
        "`python -m retromae_ds.flag_table` and paste its output between the flag-table markers")


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/ and bench/results/"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = [line for line in ci if line.startswith("pip install ")]
    assert len(test_command) == 1, ".ci/run should hold one `pip install ... && python -m pytest ...` line"
    for command in (DEMO_COMMAND, test_command[0]):
        assert command in lines, f"README.md must contain this command exactly, on its own line:\n{command}"


def test_readme_quotes_the_demos_own_figures():
    """The demo's figures live in one file, which tests/test_demo.py (full tier) checks against a real run of
    the demo; the README's results row quotes that file, so the two cannot drift apart again."""
    figures = json.loads((ROOT / "bench" / "results" / "demo_figures.json").read_text())
    rows = [line for line in README.read_text().splitlines() if line.startswith("| demo (command 1)")]
    assert len(rows) == 1, "README.md needs one results row starting with `| demo (command 1)`"
    for key, label in (("heldout/mrr10", "held-out MRR@10"), ("lee/pearson_cls", "Lee Pearson [CLS]")):
        quoted = f"{label} {figures['start'][key]:.3f} → {figures['end'][key]:.3f}"
        assert quoted in rows[0], f"README's demo row should say `{quoted}` (bench/results/demo_figures.json)"


def _markdown_files():
    return [README, *sorted(DOCS.glob("*.md"))]


def test_relative_links_point_to_existing_files():
    broken = []
    for md in _markdown_files():
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)  # code blocks hold no links
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # http(s):, mailto:, in-page anchors
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "relative links to missing files:\n" + "\n".join(broken)

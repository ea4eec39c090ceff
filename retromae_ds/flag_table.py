"""The training flags as a markdown table, built from the config's help texts (docs/training.md).

    python -m retromae_ds.flag_table        # print the table; paste it between the markers in docs/training.md

Why generated: the help text of each `TrainConfig` field is the one description of a flag (`--help`
and YAML keys come from it too), so the table in the docs cannot drift from the code;
tests/test_docs.py compares the two.
"""

from __future__ import annotations

import argparse
import dataclasses

from retromae_ds.config import config_fields


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def flag_table_markdown() -> str:
    """One row per user flag: flag (with its choices or --no- form), default, help. Hidden fields
    (help = argparse.SUPPRESS) are left out."""
    rows = ["| flag | default | help |", "| --- | --- | --- |"]
    for f in config_fields():
        help_text = f.metadata["help"]
        if help_text is argparse.SUPPRESS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            flag = f"{flag}, --no-{flag[2:]}"
            shown = "on" if default else "off"
        elif default in ("", []):
            shown = ""
        else:
            shown = f"`{_cell(default)}`"
        if "choices" in f.metadata:
            flag += " {" + ",".join(f.metadata["choices"]) + "}"
        elif isinstance(default, list):
            flag += " ..."
        rows.append(f"| `{_cell(flag)}` | {shown} | {_cell(help_text)} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flag_table_markdown(), end="")

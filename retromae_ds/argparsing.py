"""The command-line parser every retromae-ds entry uses (`retromae-ds ...`, launch/pretrain.py).

Two differences from argparse's defaults, both for typos:
- abbreviations are refused (`allow_abbrev=False`): `--micro-batch 4` is an error, not a silent
  `--micro-batch-size 4`, so that a flag that is later added with a longer name never changes what an
  old command line means;
- an unknown flag or subcommand gets the nearest known one suggested (difflib), as YAML keys do.
"""

from __future__ import annotations

import argparse
import difflib
import re


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser without abbreviations and with "did you mean" for unknown flags.
    Subparsers made from it (`add_subparsers`) are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # the subcommand's parser knows the flags that were meant (set by cli.build_parser)
            chosen = getattr(parsed, "_parser", None) or self
            chosen.error(unknown_arguments_message(extras, option_strings(chosen)))
        return parsed

    def error(self, message: str):
        choice = re.match(r"argument (.+?): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(3))
            close = difflib.get_close_matches(choice.group(2), options, n=1, cutoff=0.6)
            if close:
                message += f". Did you mean '{close[0]}'?"
        super().error(message)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every --flag of a parser (help included), in the order they were added."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def suggest_flag(word: str, known: list[str]) -> str | None:
    """The known flag nearest to `word` (`--micro-batch=4` is compared as `--micro-batch`), or None."""
    name = word.split("=", 1)[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    # a prefix of a longer flag (an abbreviation, refused on purpose): the flag it abbreviates
    longer = [k for k in known if k.startswith(name) and len(name) > 3]
    return longer[0] if len(longer) == 1 else None


def unknown_arguments_message(extras: list[str], known: list[str]) -> str:
    """'unrecognized arguments: ...' plus, per unknown --flag, the nearest known flag."""
    hints, abbreviated = [], False
    for word in extras:
        if word.startswith("--"):
            name = word.split("=", 1)[0]
            near = suggest_flag(word, known)
            hints.append(f"{name}: did you mean {near}?" if near else f"{name}: no such flag")
            abbreviated |= bool(near and near.startswith(name))
    text = f"unrecognized arguments: {' '.join(extras)}"
    if hints:
        tail = "abbreviations are not accepted" if abbreviated else "--help lists the flags"
        text += " (" + "; ".join(hints) + f"; {tail})"
    return text

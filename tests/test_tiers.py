"""The test tiers (tests/README.md): the README's test command runs the default tier, so every test that
scripts/mutation_check.py relies on to catch a planted bug must be in it, not in the full tier (`full`
marker: on the test, its module, or its parameter)."""

from __future__ import annotations

import importlib

import pytest

from scripts.mutation_check import MUTATIONS


def _names(marks) -> set[str]:
    marks = marks if isinstance(marks, (list, tuple)) else [marks]
    return {m.name for m in marks}


def tier_marks(node_id: str) -> set[str]:
    """The names of the marks a test id gets from its module, its function and its parameter set."""
    path, _, name = node_id.partition("::")
    func, _, param = name.partition("[")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    test = getattr(module, func, None)
    assert test is not None, f"{node_id}: no test {func} in {path} (renamed? update scripts/mutation_check.py)"
    found = _names(getattr(module, "pytestmark", [])) | _names(getattr(test, "pytestmark", []))
    if param:
        ids = {}
        for mark in getattr(test, "pytestmark", []):
            if mark.name == "parametrize":
                ids.update({p.id: p for p in mark.args[1] if getattr(p, "id", None)})
        assert param[:-1] in ids, f"{node_id}: no parameter set {param[:-1]!r} (known: {sorted(ids)})"
        found |= _names(ids[param[:-1]].marks)
    return found


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.id)
def test_every_mutations_tests_are_in_the_default_tier(mutation):
    full = [t for t in mutation.tests if "full" in tier_marks(t)]
    assert not full, f"{mutation.id}: these tests are in the full tier, which the README's command skips: {full}"

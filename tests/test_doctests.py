"""The examples in the docstrings of ``omics/`` and ``schema/`` run, and show what they say."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for package in ("omics", "schema")
    for path in (ROOT / package).glob("*.py")
    if path.name != "__init__.py" and ">>>" in path.read_text()
)


def test_the_public_numerics_carry_examples():
    for name in ("omics.linear_model", "omics.design", "omics.contrasts", "omics.statistics", "schema.statistics"):
        assert name in MODULES, f"{name} lost its docstring examples"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run the test with -s)"

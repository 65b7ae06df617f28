"""Run the Examples in every public docstring as doctests (numpydoc style)."""
import importlib

import pytest
from support import run_doctests

MODULES = ["pyqlora", "pyqlora._codebooks", "pyqlora._quantize", "pyqlora._array", "pyqlora._config",
           "pyqlora._runtime", "pyqlora._matmul", "pyqlora._pager", "pyqlora.nn", "pyqlora.lora", "pyqlora.optim"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = run_doctests(importlib.import_module(name))
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
    if name not in ("pyqlora._config",):
        assert result.attempted > 0, f"no doctest examples found in {name}"

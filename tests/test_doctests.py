"""Run the Examples in every public docstring as doctests (numpydoc style)."""
import doctest
import importlib

import pytest

MODULES = ["pyqlora", "pyqlora._codebooks", "pyqlora._quantize", "pyqlora._array", "pyqlora._config",
           "pyqlora._runtime", "pyqlora._matmul", "pyqlora._pager", "pyqlora.nn", "pyqlora.lora", "pyqlora.optim"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    for t in tests:
        runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"
    if name not in ("pyqlora._config",):
        assert result.attempted > 0, f"no doctest examples found in {name}"

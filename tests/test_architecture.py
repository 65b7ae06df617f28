"""The layers of the pyqlora package and what each may import (docs/architecture.md).

The package has three layers, one direction of dependency:

- the array API: ``pyqlora/__init__.py`` and ``pyqlora/_*.py`` (numpy, ml_dtypes and the
  compiled bindings ``pyqlora._nf4core``);
- the torch glue: ``nn``, ``lora``, ``optim``, ``distributed`` and what they share in
  ``pyqlora/_glue/``;
- the Hugging Face integration ``pyqlora/hf/`` beside the glue, above it: torch glue plus
  transformers and peft, registered with them only by ``import pyqlora.hf``;
- the application: ``pyqlora/app/`` (and ``pyqlora/__main__.py``, its entry point).

These tests read the sources with ``ast`` (every import statement, at module level or
inside a function) and check the rules; the first one also imports the package.
"""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

import pyqlora

PACKAGE = pathlib.Path(pyqlora.__file__).resolve().parent
# where the sources are: the installed package (CI installs it), or its source tree (editable)
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
COMPILED = {"pyqlora._nf4core"}  # the Cython bindings: the array API's foundation

# the array API may import torch lazily in these modules only: GPU arrays are torch CUDA tensors
# (their outputs are allocated by torch), and Pager.as_tensor returns a tensor
TORCH_LAZY_OK = {"pyqlora._cuda", "pyqlora._pager"}


def module_name(path):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in SOURCES}
KNOWN = set(MODULES) | COMPILED


def is_package(name):
    return MODULES.get(name, pathlib.Path()).name == "__init__.py"


def layer(name):
    """'array', 'glue', 'hf' or 'app' for a module of pyqlora."""
    parts = name.split(".")
    if name == "pyqlora" or name in COMPILED:
        return "array"
    if parts[1] in ("app", "__main__"):
        return "app"
    if parts[1] == "hf":
        return "hf"
    if parts[1] == "_glue" or parts[1] in ("nn", "lora", "optim", "distributed"):
        return "glue"
    assert parts[1].startswith("_") and len(parts) == 2, f"{name}: a module outside the known layers"
    return "array"


class Import:
    """One imported name: the statement's module, the module it resolves to, the name, where."""

    def __init__(self, source, target, name, lineno, lazy, module_level):
        self.source, self.target, self.name, self.lineno = source, target, name, lineno
        self.lazy, self.module_level = lazy, module_level

    def __repr__(self):
        return f"{MODULES[self.source].relative_to(PACKAGE.parent)}:{self.lineno}: {self.target}" + (
            f" ({self.name})" if self.name else "")


def _resolve_from(source, node):
    if node.level == 0:
        return node.module
    base = source.split(".") if is_package(source) else source.split(".")[:-1]
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(source):
    """Every import of a pyqlora module by `source`, resolved to the module it loads."""
    tree = ast.parse(MODULES[source].read_text(), filename=str(MODULES[source]))
    found = []

    def visit(node, lazy):
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(source, alias.name, None, child.lineno, lazy, not lazy))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_from(source, child)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in KNOWN else base
                    found.append(Import(source, target, None if target == sub else alias.name, child.lineno, lazy,
                                        not lazy))
            visit(child, inner)

    visit(tree, False)
    return found


ALL = [imp for name in MODULES for imp in imports_of(name)]
OURS = [imp for imp in ALL if imp.target == "pyqlora" or imp.target.startswith("pyqlora.")]


def test_every_import_of_pyqlora_resolves_to_a_module():
    unknown = [imp for imp in OURS if imp.target not in KNOWN]
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    assert {"pyqlora", "pyqlora._array", "pyqlora.nn", "pyqlora._glue.products", "pyqlora.app.cli",
            "pyqlora.app.finetune.run"} <= set(MODULES)  # the test reads the layout it is meant for


def test_import_pyqlora_does_not_import_torch():
    """Rule (a): the array API works, and imports, without torch."""
    code = ("import sys, pyqlora, pyqlora.app; import numpy as np; pyqlora.quantize(np.ones(64, np.float32)); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(__file__) or ".")
    assert out.stdout.strip() == "[]", f"import pyqlora imported {out.stdout.strip()}"


def test_array_api_imports_only_the_array_api():
    """Rule (b): the array API imports neither torch at module level nor any module above it."""
    array = [imp for imp in ALL if layer(imp.source) == "array"]
    above = [imp for imp in array if imp in OURS and layer(imp.target) != "array"]
    assert not above, f"the array API imports modules of a higher layer: {above}"
    torch = [imp for imp in array if imp.target == "torch" or imp.target.startswith("torch.")]
    eager = [imp for imp in torch if imp.module_level]
    assert not eager, f"the array API imports torch at module level: {eager}"
    lazy_elsewhere = [imp for imp in torch if imp.source not in TORCH_LAZY_OK]
    assert not lazy_elsewhere, f"torch imported by array-API modules other than {sorted(TORCH_LAZY_OK)}: " \
                               f"{lazy_elsewhere}"


def test_only_the_application_imports_the_application():
    """Rule (c): nothing outside pyqlora/app/ (and its entry point __main__) imports it."""
    bad = [imp for imp in OURS if layer(imp.target) == "app" and layer(imp.source) != "app"]
    assert not bad, f"imports of the application from below it: {bad}"


def test_torch_glue_imports_neither_hf_nor_the_application():
    bad = [imp for imp in OURS if layer(imp.source) == "glue" and layer(imp.target) in ("hf", "app")]
    assert not bad, bad


def test_shared_glue_imports_no_public_glue_module():
    """``pyqlora/_glue/`` is what nn, lora, optim and distributed share: it imports none of them (no cycle)."""
    public = {"pyqlora.nn", "pyqlora.lora", "pyqlora.optim", "pyqlora.distributed"}
    bad = [imp for imp in OURS if imp.source.startswith("pyqlora._glue") and imp.target in public]
    assert not bad, bad


def test_hf_imports_the_glue_and_the_array_api_only():
    """pyqlora.hf sits beside the torch glue: it may import the glue, the array API and itself, never the app;
    and no other layer imports it (it registers with transformers and PEFT when, and only when, imported)."""
    assert "pyqlora.hf" in MODULES and is_package("pyqlora.hf")
    bad = [imp for imp in OURS if layer(imp.source) == "hf" and layer(imp.target) not in ("array", "glue", "hf")]
    assert not bad, f"pyqlora.hf imports {bad}"
    users = [imp for imp in OURS if layer(imp.target) == "hf" and layer(imp.source) not in ("hf", "app")]
    assert not users, f"modules below the application import pyqlora.hf: {users}"


def test_import_of_the_torch_glue_registers_nothing_with_hugging_face():
    """Importing pyqlora and its torch glue imports neither transformers, peft nor pyqlora.hf."""
    code = ("import sys, pyqlora, pyqlora.nn, pyqlora.lora, pyqlora.optim; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft', 'trl') "
            "or m.startswith('pyqlora.hf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(__file__) or ".")
    assert out.stdout.strip() == "[]", f"importing the torch glue imported {out.stdout.strip()}"


def test_no_import_cycle():
    """Rule (d): the graph of imports among pyqlora's modules (lazy ones included) has no cycle."""
    graph = {name: sorted({imp.target for imp in OURS if imp.source == name and imp.target != name})
             for name in MODULES}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_private_name_crosses_a_module():
    """A module imports no private name (``_x``, not a module) from another: share it through a public name."""
    bad = [imp for imp in OURS if imp.name is not None and imp.name.startswith("_") and not imp.name.startswith("__")]
    assert not bad, f"private names imported from other modules: {bad}"


def test_application_uses_public_or_glue_names_only():
    """The application imports pyqlora's public modules, ``pyqlora._glue`` and itself, nothing private;
    and reaches no private attribute of an imported pyqlora module (``pq._x``)."""
    def allowed(target):
        return target not in COMPILED and all(not p.startswith("_") or p == "_glue" for p in target.split(".")[1:])

    app = [imp for imp in OURS if layer(imp.source) == "app"]
    bad = [imp for imp in app if not allowed(imp.target)]
    assert not bad, f"the application imports private modules: {bad}"
    for name, path in MODULES.items():
        if layer(name) != "app":
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name == "pyqlora" or a.name.startswith("pyqlora.")}
        aliases |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("pyqlora") and n.level == 0 for a in n.names}
        reach = [f"{path.name}:{n.lineno}: {n.value.id}.{n.attr}" for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
                 and n.attr.startswith("_") and not n.attr.startswith("__")]
        assert not reach, f"the application reaches private names: {reach}"

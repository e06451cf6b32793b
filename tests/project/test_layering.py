"""The import rule (docs/architecture.md): every module of mmmod (kernels/ included, shipped as
``mmmod.kernels``) imports only from its own layer or the layers below it, and no set of
modules imports itself in a cycle; kernels/ is pure ``@triton.jit`` code that imports only
triton (and math). Imports are read from the source (``ast``), lazy imports inside functions
included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the layers, lowest first: a module may import its own layer and the ones below
LAYERS = [
    # leaves: plain-torch definitions and helpers that import nothing else of mmmod
    ["mmmod._version", "mmmod.reference", "mmmod.slices", "mmmod.filters", "mmmod.losses",
     "mmmod.data", "mmmod.monitor"],
    ["mmmod._ops"],                   # the one op library: schemas, fakes, reference defaults
    ["mmmod._ext"],                   # the compiled extensions' loader
    ["mmmod.kernels"],                # Triton @jit code only (imports triton, nothing of mmmod)
    # registry, resolver, the built-in backends; mmmod.backends.triton: the Triton backend's
    # declaration, one launcher per op, its table builder and launch point
    ["mmmod.backends", "mmmod.backends.triton"],
    ["mmmod.fusion", "mmmod.methods"],
    ["mmmod.functional"],
    # the step and what it records (the signals read the optimizer's selection and collectives)
    ["mmmod.optim", "mmmod.monitor.signals"],
    # what a user reaches: evaluation-time diagnostics, framework integrations, the CLIs
    ["mmmod.diagnostics", "mmmod.integrations"],
    ["mmmod.info", "mmmod.demo", "mmmod.monitor.plot", "mmmod._cli", "mmmod",
     "mmmod.__main__"],
]


def _modules() -> dict:
    """module name -> (path, is_package) for mmmod/ and kernels/ (as mmmod.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "mmmod", ["mmmod"]), (ROOT / "kernels", ["mmmod", "kernels"])):
        for p in sorted(base.rglob("*.py")):
            parts = prefix + list(p.relative_to(base).with_suffix("").parts)
            pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if pkg else parts)] = (p, pkg)
    return out


MODULES = _modules()


def _imports(name: str) -> set:
    path, pkg = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[:len(name.split(".")) - (node.level - (1 if pkg else 0))]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod
                       for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            targets = [node.args[0].value]  # importlib.import_module("mmmod....")
        for t in targets:
            if t.split(".")[0] != "mmmod":
                continue
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t != name:
                found.add(t)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = i, prefix.count(".")
    assert best is not None, f"{name} is in no layer of tests/project/test_layering.py: add it"
    return best


pytestmark = pytest.mark.unit


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def test_no_upward_import():
    bad = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
           for a, deps in GRAPH.items() for b in deps if layer_of(b) > layer_of(a)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(GRAPH.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_one_library_object():
    """One ``torch.library.Library`` in the package (mmmod/_ops/library.py)."""
    hits = [str(p.relative_to(ROOT)) for p, _ in MODULES.values()
            if "torch.library.Library(" in p.read_text()]
    assert hits == ["mmmod/_ops/library.py"], hits


def test_reference_is_a_leaf():
    bad = [(a, b) for a, deps in GRAPH.items() if a.startswith("mmmod.reference")
           for b in deps if not b.startswith("mmmod.reference")]
    assert not bad, bad


#: what a file of kernels/ may import besides its sibling kernel files (``from .x import``)
KERNEL_IMPORTS = {"triton", "math", "__future__"}


def _foreign_imports(source: str, path: str = "<kernel>") -> list:
    """Imports of a kernels/ file outside :data:`KERNEL_IMPORTS` and its own folder."""
    bad = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling kernel file, itself checked here
            names = [("." * node.level) + (node.module or "")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("import_module",
                                                                             "__import__"):
            names = ["importlib"]
        else:
            continue
        bad += [f"{path}:{node.lineno} imports {n}" for n in names
                if n.split(".")[0] not in KERNEL_IMPORTS]
    return bad


def test_kernels_import_only_triton():
    """The launchers, tables and torch live in mmmod/backends/triton/; kernels/ holds only what
    the Triton compiler (and tools/aot.py) compiles."""
    files = sorted((ROOT / "kernels").rglob("*.py"))
    assert len(files) >= 6
    bad = [b for p in files for b in _foreign_imports(p.read_text(), str(p.relative_to(ROOT)))]
    assert not bad, "\n".join(bad)


def test_the_kernel_import_check_sees_foreign_imports():
    src = ("import triton\nimport triton.language as tl\nimport math\nfrom .utils import x\n"
           "def f():\n    import torch\n    from mmmod.reference import philox\n"
           "    from .. import _ops\n")
    assert [b.split(" imports ")[1] for b in _foreign_imports(src)] == [
        "torch", "mmmod.reference", ".."]


def test_the_checker_sees_a_planted_cycle_and_upward_import(monkeypatch):
    graph = dict(GRAPH)
    graph["mmmod.reference.scores"] = {"mmmod.optim.modulated"}
    monkeypatch.setitem(globals(), "GRAPH", graph)
    with pytest.raises(AssertionError, match="reference.scores"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="->"):
        test_no_import_cycle()

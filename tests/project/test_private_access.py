"""No module of mmmod reads or writes a ``_private`` attribute of an object from another module.

Read from the source (``ast``): an attribute access ``x._name`` (one leading underscore, not a
dunder) is allowed only on ``self``/``cls``/``super()``, when the module itself defines
``_name`` (a ``def``, a class-level assignment or a ``self._name = ...``: the object is one of
the module's own, e.g. the optimizer unwrapped from a framework proxy), on torch itself, or
when listed below with the reason no public way exists."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: private names of other libraries' objects that have no public equivalent
ALLOWED_NAMES = {
    # torch.optim.Optimizer's hook registries: the wrapper fills its own as torch does and
    # runs them around state_dict/load_state_dict; the fused update asks whether an inner
    # optimizer has step pre-hooks. torch offers register_* but no public reader.
    "_optimizer_step_pre_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
    "_version",  # a tensor's version counter: how observe() sees a backward without a sync
    "_scale",  # GradScaler's scale tensor: get_scale() would read it on the host
}

#: files allowed any private access, with why
ALLOWED_FILES = {
    # the Triton backend package launches mmmod.kernels' private @jit functions (kernels/ is
    # pure @triton.jit code with no launcher of its own)
    "mmmod/backends/triton/",
}


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _own_names(tree: ast.AST) -> set:
    """Private names the module defines: functions, class-level and self.<name> assignments."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for e in ast.walk(t):
                    if isinstance(e, ast.Name):
                        out.add(e.id)
                    elif isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and \
                            e.value.id in ("self", "cls"):
                        out.add(e.attr)
    return out


def violations(source: str, where: str) -> list[str]:
    tree = ast.parse(source, where)
    own = _own_names(tree)
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in ALLOWED_NAMES:
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in ("self", "cls"):
            continue
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
            continue
        if _root_name(v) == "torch" or name in own:
            continue
        bad.append(f"{where}:{node.lineno}: {ast.unparse(v)}.{name}")
    return bad


pytestmark = pytest.mark.unit


def test_no_module_reads_another_modules_private_attributes():
    bad = []
    for path in sorted((ROOT / "mmmod").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if not rel.startswith(tuple(ALLOWED_FILES)):
            bad += violations(path.read_text(), rel)
    assert not bad, "private attributes of other modules' objects:\n" + "\n".join(bad)


def test_the_checker_sees_a_planted_private_read():
    planted = ("def entry(opt):\n"
               "    return opt._method_state, opt.run._skipped\n")
    found = violations(planted, "planted.py")
    assert found == ["planted.py:2: opt._method_state", "planted.py:2: opt.run._skipped"]


def test_the_checker_allows_own_names_self_and_torch():
    ok = ("import torch\n"
          "class A:\n"
          "    def __init__(self):\n"
          "        self._x = 1\n"
          "    def _helper(self):\n"
          "        return torch._foreach_add, torch._C._get_tracing_state\n"
          "def f(a, t):\n"
          "    return a._x, a._helper(), t._version, a.__dict__\n")
    assert violations(ok, "ok.py") == []

"""The test suite mirrors the package: each test module sits in the folder of the layer it tests.

Shared helpers (``_models.py``, ``_sync_spy.py``, ``infos.py``, ...) sit at ``tests/`` (the
conftest's directory, on ``sys.path``); a test module imports helpers, never another test module
of a different folder."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
#: test folder -> what it tests (a package of mmmod, the kernels, or the project as a whole)
FOLDERS = {
    "ops": "mmmod/_ops", "reference": "mmmod/reference", "backends": "mmmod/backends",
    "kernels": "kernels", "optim": "mmmod/optim", "methods": "mmmod/methods",
    "distributed": "mmmod/optim", "fusion": "mmmod/fusion.py", "monitor": "mmmod/monitor",
    "diagnostics": "mmmod/diagnostics", "demo": "mmmod/demo", "integrations": "mmmod/integrations",
    "project": ".",
}


def test_no_test_module_outside_a_folder():
    flat = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not flat, f"move {flat} into the tests/ folder of the layer they test: {sorted(FOLDERS)}"


def test_every_folder_names_a_part_of_the_package():
    folders = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert folders <= set(FOLDERS), f"unknown test folders {sorted(folders - set(FOLDERS))}"
    for folder, target in FOLDERS.items():
        assert (ROOT / target).exists(), f"tests/{folder} mirrors {target}, which does not exist"


def test_test_modules_import_only_helpers_of_other_folders():
    where = {p.stem: p.parent.name for p in TESTS.glob("*/test_*.py")}
    bad = []
    for p in sorted(TESTS.glob("*/test_*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{p.parent.name}/{p.name} imports {n}" for n in names
                    if n in where and where[n] != p.parent.name]
    assert not bad, bad

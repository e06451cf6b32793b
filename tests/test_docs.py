"""The documentation stays true to the code: every environment variable the project reads is in
README's table, and the repository stands alone (no reference to files outside it)."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ["mmmod", "kernels", "csrc", "scripts", ".ci", "setup.py", "tests", "benchmarks"]
# reads of an environment variable: getenv("X"), os.environ.get("X"), environ["X"], ${X} / $X
READS = re.compile(r'getenv\("(MMMOD_\w+)"|environ(?:\.get\(|\[)"(MMMOD_\w+)"|\$\{?(MMMOD_\w+)')


def _files():
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.is_file() and f.suffix in (".py", ".sh", ".cpp", ".h", ".cu", "") and \
                    "__pycache__" not in f.parts:
                yield f


def test_every_environment_variable_is_in_the_readme_table():
    read = set()
    for f in _files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for groups in READS.findall(text):
            read.update(g for g in groups if g)
    assert {"MMMOD_CPU_KERNELS", "MMMOD_DISABLE_EXTENSION", "MMMOD_NO_EXTENSION"} <= read
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Environment variables"):]
    table = table[:table.index("\n## ")]
    missing = sorted(v for v in read if f"`{v}" not in table)
    assert not missing, f"environment variables read by the code but not in README's table: {missing}"


def test_no_reference_to_files_outside_the_repository():
    for f in list(_files()) + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        if f.resolve() == pathlib.Path(__file__).resolve():
            continue
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        assert "SPEC.md" not in text and "../shared" not in text, f

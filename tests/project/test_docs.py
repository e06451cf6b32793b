"""The documentation stays true to the code: README's Quick start runs, every environment
variable the project reads is in docs/install.md's table, and the repository stands alone (no
reference to files outside it)."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = ["mmmod", "kernels", "tools", "csrc", "scripts", ".ci", "setup.py", "tests", "benchmarks"]
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


def test_every_environment_variable_is_in_the_install_table():
    read = set()
    for f in _files():
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for groups in READS.findall(text):
            read.update(g for g in groups if g)
    assert {"MMMOD_CPU_KERNELS", "MMMOD_DISABLE_EXTENSION", "MMMOD_NO_EXTENSION"} <= read
    doc = (ROOT / "docs" / "install.md").read_text()
    table = doc[doc.index("## Environment variables"):]
    table = table[:table.index("\n## ")] if "\n## " in table else table
    missing = sorted(v for v in read if f"`{v}" not in table)
    assert not missing, f"environment variables read by the code but not in docs/install.md's table: {missing}"


def readme_block(heading: str, lang: str = "python") -> str:
    """The first ``lang`` code block under README's ``heading``."""
    readme = (ROOT / "README.md").read_text()
    part = readme[readme.index(heading):]
    part = part[:re.search(r"\n##+ ", part[3:]).start() + 3]
    return re.search(rf"```{lang}\n(.*?)```", part, re.S).group(1)


def test_readme_quick_start_runs_as_written(tmp_path):
    code = readme_block("## Quick start")
    assert "ModulatedOptimizer(" in code and "opt.step()" in code
    # as a user runs it: a fresh interpreter, the snippet alone, plus a check of what it did
    check = ("\nassert h['coeff'].shape == (3 * 8, 2), h['coeff'].shape\n"
             "assert opt.backend != 'auto' and opt.requested_backend == 'auto'\n"
             "assert float(h['coeff'].min()) < 1.0  # the leading modality was damped\n")
    r = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_snippets_that_continue_the_quick_start_run(tmp_path):
    """The multi-objective and the imbalance snippets run after the Quick start's, as written."""
    code = "\n".join([readme_block("## Quick start"), readme_block("### Several objectives"),
                      readme_block("## Measure the imbalance")])
    check = ("\nassert opt.method == 'mmpareto' and opt.step_count == 8\n"
             "assert set(res.to_dict()) and 'audio' in str(diagnostics.report(shapley=res))\n")
    r = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_links_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
    assert len(readme.splitlines()) <= 220


def test_no_reference_to_files_outside_the_repository():
    for f in list(_files()) + sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        if f.resolve() == pathlib.Path(__file__).resolve():
            continue
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        assert "SPEC.md" not in text and "../shared" not in text, f


def test_docs_index_lists_every_document():
    index = (ROOT / "docs" / "index.md").read_text()
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md"))
               if p.name != "index.md" and f"]({p.name})" not in index]
    assert not missing, f"docs/index.md does not list {missing}"


def test_architecture_recipe_files_exist():
    """Every file docs/architecture.md's recipes name is in the tree (the recipes stay true)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:mmmod|tests|kernels|tools|docs)/[\w/.]+\.(?:py|md))`", text))
    assert "mmmod/_ops/__init__.py" in named and "tests/backends/test_outside_backend.py" in named
    missing = sorted(n for n in named if "<" not in n and not (ROOT / n).exists())
    assert not missing, missing


def test_project_docs_speak_of_the_project_only():
    for name in ("benchmarks.md", "demo.md", "triton.md", "fused.md", "architecture.md",
                 "index.md"):
        text = (ROOT / "docs" / name).read_text()
        for word in ("session", "previous round", "issue 1", "issue 2", "issue 3", "issue 4",
                     "issue 5", "issue 6", "issue 7", "issue 8", "issue 9"):
            assert word not in text.lower(), (name, word)

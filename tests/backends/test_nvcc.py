"""The CUDA sources compile with `nvcc -c -arch=sm_90 -Werror all-warnings` (no GPU needed)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cu_file_compiles_for_sm90():
    r = subprocess.run(["bash", str(ROOT / ".ci" / "nvcc_check.sh"), "--cu-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NVCC": NVCC})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nvcc_check: ok" in r.stdout


def _setup_py_functions():
    """setup.py's toolkit lookup, without running setup() (the module's last statement)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    ns = {"os": os}
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name in ("_is_toolkit", "_wrapped_nvcc_homes", "find_cuda_home")]
    exec(compile(ast.Module(keep, []), "setup.py", "exec"), ns)
    return ns


def _fake_toolkit(root):
    for rel in ("bin/nvcc", "include/cuda_runtime.h", "lib64/libcudart.so"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x7fELF" + b"\0" * 8192 if rel == "bin/nvcc" else b"")
    return root


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME = parent of the PATH nvcc: /usr/local for a wrapper in
    /usr/local/bin, and then -lcudart is not found. setup.py reads the wrapper instead."""
    fns = _setup_py_functions()
    kit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {kit}/bin/nvcc "$@"\n')
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", str(wrap))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert not fns["_is_toolkit"](str(tmp_path))  # the wrapper's parent is no toolkit
    home, how = fns["find_cuda_home"]()
    assert home == os.path.realpath(kit) and "wrapper" in how
    # an explicit CUDA_HOME that is a real toolkit wins; one that is not is passed over
    other = _fake_toolkit(tmp_path / "other")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert fns["find_cuda_home"]()[0] == os.path.realpath(other)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert fns["find_cuda_home"]()[0] == os.path.realpath(kit)


def test_setup_reports_no_toolkit(tmp_path, monkeypatch):
    fns = _setup_py_functions()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if fns["_is_toolkit"]("/usr/local/cuda"):
        assert fns["find_cuda_home"]()[0] == os.path.realpath("/usr/local/cuda")
    else:
        home, why = fns["find_cuda_home"]()
        assert home is None and "no CUDA toolkit" in why and str(tmp_path) in why

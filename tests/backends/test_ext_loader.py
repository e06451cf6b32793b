"""The extension loader: a missing, disabled or stale build never breaks ``import mmmod``; the
backends then say why and how to build (runs with or without the extension built)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmmod import _ext

ROOT = Path(__file__).resolve().parents[2]


def test_stale_torch_version_is_refused():
    why = _ext._stale_reason({"backend": "cpu", "torch": "0.0.0", "source_hash": ""})
    assert "stale build" in why and "pip install -e ." in why and torch.__version__ in why


def test_changed_sources_are_refused(tmp_path, monkeypatch):
    (tmp_path / "a.cpp").write_text("int x;\n")
    h = _ext.source_hash(str(tmp_path))
    monkeypatch.setattr(_ext, "_CSRC", str(tmp_path))
    info = {"backend": "cpu", "torch": torch.__version__, "source_hash": h}
    assert _ext._stale_reason(info) == ""
    (tmp_path / "a.cpp").write_text("int y;\n")
    assert "csrc/ changed" in _ext._stale_reason(info)
    monkeypatch.setenv("MMMOD_IGNORE_STALE", "1")
    assert _ext._stale_reason(info) == ""


def test_source_hash_covers_the_layer_folders(tmp_path):
    """csrc/ is split into common/, cpu/, cuda/: an edit, a move between folders or a new file in
    any of them makes the build stale."""
    for rel in ("module.cpp", "common/philox.h", "cpu/chunks.h", "cuda/kernels.cu"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"// {rel}\n")
    h = _ext.source_hash(str(tmp_path))
    (tmp_path / "cuda" / "kernels.cu").write_text("// edited\n")
    edited = _ext.source_hash(str(tmp_path))
    assert edited != h
    (tmp_path / "cuda" / "kernels.cu").rename(tmp_path / "common" / "kernels.cu")
    moved = _ext.source_hash(str(tmp_path))
    assert moved not in (h, edited)
    (tmp_path / "cpu" / "new.cpp").write_text("")
    assert _ext.source_hash(str(tmp_path)) not in (h, edited, moved)


def test_setup_py_builds_every_source_file():
    """Every .cpp / .cu under csrc/ is in one of setup.py's source lists (a file left out would
    still be hashed, but its kernels would never be registered)."""
    text = (ROOT / "setup.py").read_text()
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".cu"):
            rel = path.relative_to(ROOT / "csrc").as_posix()
            assert f'"{rel}"' in text, f"csrc/{rel} is in no source list of setup.py"


def test_source_hash_matches_setup_py():
    """setup.py loads mmmod/_ext.py as a file: the same function hashes the same tree."""
    assert _ext.source_hash(str(ROOT / "csrc")) == _ext.source_hash(str(ROOT / "csrc"))
    assert len(_ext.source_hash(str(ROOT / "csrc"))) == 16


def run(code, **env):
    e = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=300)


def test_disabled_extension_falls_back_with_reason():
    code = ("import warnings, torch, mmmod\n"
            "from mmmod import backends, functional\n"
            "live, why = backends.status('cpu'); assert not live and 'MMMOD_DISABLE_EXTENSION' in why, why\n"
            "try:\n    backends.get('cpu')\nexcept RuntimeError as e:\n    assert 'not available' in str(e)\n"
            "else:\n    raise SystemExit('expected RuntimeError')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        functional.scores([torch.randn(4, 3)] * 2, torch.zeros(4, dtype=torch.long))\n"
            "assert len([x for x in w if 'no fused backend' in str(x.message)]) == 1, w\n"
            "print('ok')\n")
    r = run(code, MMMOD_DISABLE_EXTENSION="1")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_info_lists_every_backend():
    r = subprocess.run([sys.executable, "-m", "mmmod.info"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for name in ("torch", "triton", "cpu", "cuda"):
        assert f"  {name}" in r.stdout
    assert "torch " + torch.__version__ in r.stdout


def test_info_reports_the_active_cpu_kernel_table():
    from mmmod import backends
    live, why = backends.status("cpu")
    if not live:
        pytest.skip(why)
    env = dict(os.environ, MMMOD_CPU_SCALAR="1")
    r = subprocess.run([sys.executable, "-m", "mmmod.info"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "cpu kernels: scalar" in r.stdout

"""The Triton kernels ship as ``mmmod.kernels`` (never a top-level ``kernels``)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, MMMOD_NO_EXTENSION="1")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                        "-q", "-w", str(out), str(ROOT)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("pip wheel failed:\n" + r.stdout + r.stderr)
    (whl,) = out.glob("mmmod-*.whl")
    return whl


def test_wheel_ships_kernels_inside_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmmod/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "mmmod/reference/philox.py" in names and "mmmod/backends/base.py" in names


def test_installed_wheel_imports_mmmod_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    code = ("import mmmod, mmmod.kernels, importlib.util as u; "
            "assert mmmod.kernels.__file__.startswith(%r), mmmod.kernels.__file__; "
            "assert u.find_spec('kernels') is None; print('ok')" % str(target))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(target)))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_this_environment_imports_mmmod_kernels_from_anywhere(tmp_path):
    """The install the tests run against (``pip install -e .`` in CI) maps mmmod.kernels."""
    code = ("import importlib.util as u, sys; s = u.find_spec('mmmod'); "
            "sys.exit(3) if s is None else None; import mmmod.kernels; "
            "assert u.find_spec('kernels') is None; print(mmmod.kernels.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=env)
    if r.returncode == 3:
        pytest.skip("mmmod is not installed in this environment (run scripts/setup.sh)")
    assert r.returncode == 0 and r.stdout.strip() == "mmmod.kernels", r.stderr


def test_wheel_ships_every_subpackage(wheel):
    """Every folder of mmmod/ with an __init__.py (demo, data, ...) is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    subpackages = [p.parent.relative_to(ROOT).as_posix()
                   for p in (ROOT / "mmmod").rglob("__init__.py")]
    missing = [d for d in subpackages if f"{d}/__init__.py" not in names]
    assert not missing, f"setup.py packages= misses {missing}"
    assert "mmmod/demo/cli.py" in names and "mmmod/data/loaders.py" in names


def test_installed_wheel_runs_the_demo_entry_point(wheel, tmp_path):
    """``python -m mmmod demo --help`` works from an installed wheel (not only from the tree)."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    r = subprocess.run([sys.executable, "-m", "mmmod", "demo", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(target)))
    assert r.returncode == 0 and "--epochs" in r.stdout, r.stderr


def test_info_says_triton_live_on_cpu_only_under_its_interpreter():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton is live on it")
    from mmmod import info
    for interp, live in (("0", False), ("1", True)):
        env = dict(os.environ, TRITON_INTERPRET=interp)
        r = subprocess.run([sys.executable, "-c", "import json, mmmod.info as i; "
                            "print(json.dumps(i.collect()['backends']['triton']))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        st = __import__("json").loads(r.stdout.strip().splitlines()[-1])
        if st["live"] is False and "cannot be imported" in st["why_not"]:
            pytest.skip(st["why_not"])
        assert st["live"] is live, st
        assert "TRITON_INTERPRET=1" in (st["note"] if live else st["why_not"])
    text = info.render({**info.collect(), "backends": {"triton": {"live": False, "why_not": "no GPU",
                                                                  "note": ""}}})
    assert "  triton  not available: no GPU" in text


def test_build_without_torch_says_how_to_install(tmp_path):
    """pip's isolated build has no torch: setup.py stops with the two ways that work."""
    (tmp_path / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("MMMOD_NO_EXTENSION", None)
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "torch cannot be imported while building mmmod" in r.stderr
    assert "pip install --no-build-isolation ." in r.stderr
    assert "MMMOD_NO_EXTENSION=1 pip install ." in r.stderr
    env["MMMOD_NO_EXTENSION"] = "1"  # the pure-Python build needs no torch
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "mmmod", r.stderr


def _setup_plan(**env):
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, MMMOD_SETUP_DRY_RUN="1", **env), timeout=60)
    assert r.returncode == 0, r.stderr
    return [line[2:] for line in r.stdout.splitlines() if line.startswith("+ ")]


def test_setup_script_uses_a_wheel_folder_only_where_there_is_one(tmp_path):
    plan = _setup_plan(MMMOD_WHEELS="")  # a machine without a wheel folder
    assert not any("/opt/wheels" in c or "--find-links" in c for c in plan), plan
    assert "python -m pip install -q torch>=2.1" in plan
    assert "bash scripts/install_torchaudio.sh" in plan  # matching torchaudio, or none
    assert not any("STRIP_NATIVE" in c for c in plan)
    assert plan[-1] == "python -m pip install -q --no-build-isolation --no-deps -e ."
    plan = _setup_plan(MMMOD_WHEELS=str(tmp_path), MMMOD_TORCH="torch==2.5.1", MMMOD_TORCHAUDIO="0")
    assert f"python -m pip install -q --find-links {tmp_path} torch==2.5.1" in plan
    assert not any("torchaudio" in c for c in plan)

"""The CUDA sources compile with `nvcc -c -arch=sm_90 -Werror all-warnings` (no GPU needed)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cu_file_compiles_for_sm90():
    r = subprocess.run(["bash", str(ROOT / ".ci" / "nvcc_check.sh"), "--cu-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NVCC": NVCC})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nvcc_check: ok" in r.stdout

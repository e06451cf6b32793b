#!/usr/bin/env bash
# Create .venv with the pinned stack and build mmmod into it (C++ extension included).
# Usage: bash scripts/setup.sh        (MMMOD_NO_EXTENSION=1 skips compiling)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch: the CPU wheel on disk (an unpinned torch would pull GBs of CUDA wheels)
python -m pip install -q --find-links /opt/wheels "torch==2.13.0+cpu" "triton==3.7.1" \
    numpy pytest ninja pybind11 hypothesis scipy matplotlib tqdm soundfile pillow "tensorboard==2.21.0" \
    "ruff==0.17.6"
if [ -f scripts/install_torchaudio.sh ]; then bash scripts/install_torchaudio.sh; fi
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q --no-build-isolation --no-deps -e .
python -m mmmod.info 2>/dev/null || python -c "import mmmod; print('mmmod', mmmod.__version__)"

#!/usr/bin/env bash
# Create .venv with torch and the development tools, and build mmmod into it (C++ extension
# included). Usage: bash scripts/setup.sh
#
#   MMMOD_TORCH=SPEC        the torch to install, e.g. "torch==2.5.1" or "torch --index-url
#                           https://download.pytorch.org/whl/cpu" (default: "torch>=2.1", which on
#                           Linux is PyPI's CUDA build; with a wheel folder, the pinned CPU stack)
#   MMMOD_WHEELS=DIR        a folder of wheels to install from first (default: /opt/wheels when it
#                           exists, as on the project's CI machines; set it empty to use none)
#   MMMOD_TORCHAUDIO=0      skip torchaudio (optional: the demo has a pure-torch log-mel)
#   MMMOD_NO_EXTENSION=1    skip compiling (pure Python: the plain-torch backend on CPU)
#   MMMOD_SETUP_DRY_RUN=1   print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
run() { if [ "${MMMOD_SETUP_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }

WHEELS=${MMMOD_WHEELS-}
if [ -z "${MMMOD_WHEELS+set}" ] && [ -d /opt/wheels ]; then WHEELS=/opt/wheels; fi
FIND=()
if [ -n "$WHEELS" ]; then
    FIND=(--find-links "$WHEELS")
    # the CI machines' pinned CPU stack (an unpinned torch would pull GBs of CUDA wheels)
    TORCH=${MMMOD_TORCH:-"torch==2.13.0+cpu triton==3.7.1"}
else
    TORCH=${MMMOD_TORCH:-"torch>=2.1"}
fi

if [ ! -x .venv/bin/python ]; then run "$PY" -m venv .venv; fi
if [ "${MMMOD_SETUP_DRY_RUN:-0}" != 1 ]; then . .venv/bin/activate; fi
run python -m pip install -q --upgrade pip
# shellcheck disable=SC2086  # TORCH may hold several requirements and pip options
run python -m pip install -q ${FIND[@]+"${FIND[@]}"} $TORCH
run python -m pip install -q ${FIND[@]+"${FIND[@]}"} numpy pytest ninja pybind11 hypothesis scipy \
    matplotlib tqdm soundfile pillow "tensorboard==2.21.0" "ruff==0.17.6"
if [ "${MMMOD_TORCHAUDIO:-1}" != 0 ] && [ -f scripts/install_torchaudio.sh ]; then
    if [ "$WHEELS" = /opt/wheels ]; then
        # CI machines: PyPI's only torchaudio near torch 2.13 is 2.11's CUDA build, whose
        # Python transforms work once its CUDA-linked native libraries are dropped
        run env TORCHAUDIO_VERSION=2.11.0 TORCHAUDIO_STRIP_NATIVE=1 bash scripts/install_torchaudio.sh
    else
        run bash scripts/install_torchaudio.sh
    fi
fi
export MAX_JOBS=${MAX_JOBS:-2}
# --no-build-isolation: the extension is compiled against the torch installed above
run python -m pip install -q --no-build-isolation --no-deps -e .
if [ "${MMMOD_SETUP_DRY_RUN:-0}" != 1 ]; then
    python -m mmmod.info 2>/dev/null || python -c "import mmmod; print('mmmod', mmmod.__version__)"
fi

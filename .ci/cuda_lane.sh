#!/usr/bin/env bash
# CI lane 2: build mmmod._C_cuda for real, the way a GPU user gets it, on a machine with no GPU.
#
# A second venv (.venv-cuda) gets PyPI's default torch==2.13.0 wheel, which is the CUDA 13.0 build
# (2.13.0+cu130; `import torch` works without a GPU), then `pip install . --no-build-isolation`
# builds mmmod._C and mmmod._C_cuda with torch's BuildExtension (a regular install, not editable),
# for TORCH_CUDA_ARCH_LIST="8.0;9.0". setup.py locates the CUDA toolkit itself and prints it.
# The tests then run against the installed package (tests/backends/test_cuda_build.py and the CPU
# extension's parity suites), from a directory where the checkout's mmmod cannot shadow it.
#
# Env: MMMOD_CUDA_VENV (default .venv-cuda), MMMOD_CUDA_LANE_WORK (build copy, default
# build/cuda-lane), MMMOD_CUDA_LANE_REUSE=1 keeps an existing venv whose
# torch is already the pinned CUDA build (local reruns; CI starts fresh), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${MMMOD_CUDA_VENV:-$REPO/.venv-cuda}
TORCH_PIN="torch==2.13.0"
WORK=${MMMOD_CUDA_LANE_WORK:-$REPO/build/cuda-lane}
START=$(date +%s)
say() { echo "cuda_lane [$(( $(date +%s) - START ))s]: $*"; }

# PyPI's CUDA wheel, not this machine's on-disk CPU wheel (find-links) or its torch cap
# (/etc/xdg/pip constraints): no pip config file, no find-links/constraint from the environment.
unset PIP_FIND_LINKS PIP_CONSTRAINT
export PIP_CONFIG_FILE=/dev/null

if [ "${MMMOD_CUDA_LANE_REUSE:-0}" = 1 ] && [ -x "$VENV/bin/python" ] \
    && "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0+cu') else 1)" 2>/dev/null; then
    say "reusing $VENV"
else
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "$TORCH_PIN" "triton==3.7.1" numpy pytest ninja pybind11 \
    hypothesis scipy
say "$("$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU available:', torch.cuda.is_available())")"
case "$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")" in
    "") echo "cuda_lane: $TORCH_PIN from the registry is not a CUDA build" >&2; exit 1 ;;
esac

# Build from a copy of the checkout (tracked and non-ignored files): the CPU venv's editable build
# keeps its own build/ objects and generated header, and nothing here can read the CPU build.
rm -rf "$WORK"
mkdir -p "$WORK/src" "$WORK/run"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$WORK/src"
say "building mmmod (regular install) with TORCH_CUDA_ARCH_LIST=8.0;9.0"
if ! (cd "$WORK/src" && MAX_JOBS=${MAX_JOBS:-2} TORCH_CUDA_ARCH_LIST="8.0;9.0" \
        "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . > "$WORK/build.log" 2>&1); then
    tail -60 "$WORK/build.log" >&2
    echo "cuda_lane: build failed (full log: $WORK/build.log)" >&2
    exit 1
fi
grep "mmmod setup:" "$WORK/build.log" || true
say "built"

cd "$WORK/run"  # no mmmod/ here: tests import the installed package
"$VENV/bin/python" -m mmmod.info
# (pytest finds the project's config from the test paths, as from the checkout)
MMMOD_EXPECT_CUDA_BUILD=1 MMMOD_EXPECT_SM=80,90 MMMOD_SOURCE_TREE="$REPO" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rs \
    "$REPO/tests/backends/test_cuda_build.py" "$REPO/tests/backends/test_cpu_ext.py" "$REPO/tests/backends/test_ext_cuda.py"
say "done"

#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu with `nvcc -c -arch=sm_90 -Werror all-warnings` (no GPU needed).
# Also syntax-checks the host-compiled CUDA glue (csrc/cuda/*.cpp) against torch's headers
# when torch is importable, unless --cu-only is given. Exits nonzero on the first failure.
# NVCC overrides the compiler (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
CU_ONLY=0
[ "${1:-}" = "--cu-only" ] && CU_ONLY=1
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$NVCC" ]; then
    echo "nvcc_check: nvcc not found (set NVCC=...)" >&2
    exit 2
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
shopt -s nullglob
files=(csrc/*.cu csrc/*/*.cu)
if [ ${#files[@]} -eq 0 ]; then
    echo "nvcc_check: no .cu files under csrc/" >&2
    exit 1
fi
"$NVCC" --version | tail -1
for f in "${files[@]}"; do
    echo "nvcc_check: $f (sm_90)"
    "$NVCC" -c -arch=sm_90 -Werror all-warnings -std=c++17 -fmad=false -lineinfo -Icsrc \
        "$f" -o "$TMP/$(basename "$f").o"
done
if [ "$CU_ONLY" = 0 ]; then
    # the project's venv when there is one (CI runs this right after scripts/setup.sh)
    DEFAULT_PY=python
    [ -x .venv/bin/python ] && DEFAULT_PY=.venv/bin/python
    PY=${PYTHON:-$DEFAULT_PY}
    if TI=$("$PY" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
        for f in csrc/cuda/*.cpp; do
            echo "nvcc_check: $f (host compiler, torch headers, syntax only)"
            "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Werror -Wno-psabi -Icsrc -I"$TI" \
                -I"$TI/torch/csrc/api/include" "$f"
        done
    else
        echo "nvcc_check: torch not importable, skipping the glue check"
    fi
fi
echo "nvcc_check: ok"

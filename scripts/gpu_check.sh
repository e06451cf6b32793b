#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with a CUDA GPU (at most ~8 minutes):
#   bash scripts/gpu_check.sh
# 1. refuses at once, before installing anything, when there is no GPU (nvidia-smi, then torch);
# 2. a venv with a CUDA torch (reusing a python whose torch already sees the GPU, else
#    torch==2.13.0 from the registry) and mmmod built into it with both extensions;
# 3. the GPU parity suites (pytest -m gpu, and the suites that run on CUDA when it is there:
#    Triton and CUDA backends vs the reference, every dtype, odd sizes, > 2^31-element offsets
#    where memory allows), the CUDA-graph capture tests;
# 4. compute-sanitizer memcheck and racecheck over a small OGM-GE step on each fused backend
#    (scripts/gpu_sanitize_step.py);
# 5. the quick GPU benchmarks (bandwidth, bench_modulate, bench_step).
# Everything is written under benchmarks/results/gpu_<date>_<device>/ (logs, JUnit XML, JSON).
# Env: PYTHON (a python to take torch from), MMMOD_GPU_VENV (default build/venv-gpu), MAX_JOBS.
# Exit status: 0 all passed, 3 no GPU here, 1 a step failed (each step's log names it).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*"; }

# -- 1. is there a GPU? (nothing is installed or built before this answer) -------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no CUDA GPU here: nvidia-smi is not on PATH. This script needs an NVIDIA GPU" \
         "and its driver; nothing was installed or built." >&2
    exit 3
fi
if ! GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) \
        || [ -z "$GPU_NAME" ]; then
    echo "gpu_check: no CUDA GPU here: nvidia-smi lists no GPU (driver not loaded?); nothing was" \
         "installed or built." >&2
    exit 3
fi
say "GPU: $GPU_NAME"
FAILED=()
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember a failure, keep going
    local name=$1; shift
    say "$name ..."
    if "$@" > "$OUT/$name.log" 2>&1; then
        say "$name: ok"
    else
        say "$name: FAILED (rc $?; log $OUT/$name.log)"; tail -25 "$OUT/$name.log"
        FAILED+=("$name")
    fi
}

# -- 2. venv with a CUDA torch and mmmod (both extensions) ----------------------------------------
VENV=${MMMOD_GPU_VENV:-$REPO/build/venv-gpu}
BASE=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    if "$BASE" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" 2>/dev/null; then
        say "venv $VENV over $BASE's torch ($("$BASE" -c 'import torch; print(torch.__version__)'))"
        "$BASE" -m venv --system-site-packages "$VENV"
    else
        say "venv $VENV with torch==2.13.0 (CUDA build) from the registry"
        "$BASE" -m venv "$VENV"
        (unset PIP_FIND_LINKS PIP_CONSTRAINT; PIP_CONFIG_FILE=/dev/null \
            "$VENV/bin/python" -m pip install -q torch==2.13.0 triton numpy pytest ninja pybind11 \
            hypothesis scipy) || { echo "gpu_check: installing torch failed" >&2; exit 1; }
    fi
fi
PY=$VENV/bin/python
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch in $VENV does not see a CUDA GPU ($("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)); nothing was built." >&2
    exit 3
fi
SLUG=$(echo "$GPU_NAME" | tr -c 'A-Za-z0-9\n' '_' | tr -s '_' | sed 's/^_//; s/_$//')
OUT=$REPO/benchmarks/results/gpu_$(date +%Y-%m-%d)_${SLUG}
mkdir -p "$OUT"
for need in pytest ninja; do
    "$PY" -c "import $need" 2>/dev/null || "$PY" -m pip install -q "$need" >/dev/null 2>&1 || true
done
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# an editable build (regular extension build, in place) so the tests and benchmarks of this
# checkout run against it; the CUDA lane checks the regular, non-editable install
step build env MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST="$ARCH" \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e .
"$PY" -m mmmod.info | tee "$OUT/info.txt"
"$PY" -m mmmod.info --json > "$OUT/info.json" 2>/dev/null
if ! "$PY" -c "from mmmod import backends; import sys; sys.exit(0 if backends.status('cuda')[0] else 1)"; then
    echo "gpu_check: the CUDA backend is not live after the build (see $OUT/info.txt)" >&2
    FAILED+=("cuda-backend-live")
fi

# -- 3. parity suites and CUDA-graph capture ------------------------------------------------------
step pytest_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$OUT/pytest_gpu.xml" tests
step pytest_cuda_suites "$PY" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" -rs \
    --junitxml="$OUT/pytest_cuda_suites.xml" tests/kernels/test_triton_kernels.py tests/optim/test_parity.py \
    tests/methods/test_methods.py tests/optim/test_capturable.py tests/optim/test_sync_free.py tests/backends/test_cuda_build.py

# -- 4. compute-sanitizer over one small OGM-GE step per fused backend ----------------------------
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-}" /usr/local/cuda; do
    [ -z "$SAN" ] && [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ] && SAN=$d/bin/compute-sanitizer
done
if [ -z "$SAN" ]; then
    say "compute-sanitizer not found: sanitizer passes NOT run"; FAILED+=("sanitizer-missing")
else
    for tool in memcheck racecheck; do
        for b in cuda triton; do
            step "sanitize_${tool}_${b}" "$SAN" --tool "$tool" --error-exitcode 1 \
                --target-processes all "$PY" scripts/gpu_sanitize_step.py --backend "$b"
        done
    done
fi

# -- 5. quick GPU benchmarks -----------------------------------------------------------------------
step benchmarks "$PY" -m benchmarks.run_all --quick --device cuda --skip bench_scores --out "$OUT"

say "results in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]}" | tee "$OUT/RESULT"
    exit 1
fi
echo "gpu_check: all passed on $GPU_NAME in $(( $(date +%s) - START ))s" | tee "$OUT/RESULT"

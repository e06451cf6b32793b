#!/usr/bin/env bash
# Install torchaudio into the active Python environment for the CPU-only torch build.
#
# PyPI only carries a CUDA build of torchaudio 2.11. Its Python transforms
# (MelSpectrogram, AmplitudeToDB, ...) are pure torch, but its bundled native libraries
# (lib/*.so) are linked against CUDA and fail to load on a CPU-only machine, which makes
# `import torchaudio` fail. Installing without dependencies (so pip does not replace the CPU
# torch) and deleting those .so files leaves a working transforms module.
# torchaudio.load/save need torchcodec and do not work here: mmmod reads WAV with soundfile.
#
# Usage: bash scripts/install_torchaudio.sh      (PYTHON=... picks the interpreter)
# mmmod never hard-depends on torchaudio: without it the demo falls back to a pure-torch log-mel.
set -euo pipefail
PY=${PYTHON:-python}
TA_VERSION=${TORCHAUDIO_VERSION:-2.11.0}

if "$PY" -c "import torchaudio.transforms" 2>/dev/null; then
    echo "torchaudio already importable: $("$PY" -c 'import torchaudio; print(torchaudio.__version__)')"
    exit 0
fi
"$PY" -m pip install -q --no-deps "torchaudio==${TA_VERSION}"
TA_DIR=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))")
if ! "$PY" -c "import torchaudio.transforms" 2>/dev/null; then
    # the native libraries do not load against this torch: drop them, keep the Python transforms
    rm -f "$TA_DIR"/lib/*.so
fi
"$PY" -c "import torch, torchaudio.transforms as T; x = T.MelSpectrogram(16000, n_mels=8)(torch.zeros(1600)); print('torchaudio', __import__('torchaudio').__version__, 'ok', tuple(x.shape))"

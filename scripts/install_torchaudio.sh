#!/usr/bin/env bash
# Install torchaudio (optional) into the active Python environment, without touching its torch.
#
# torchaudio's native libraries are built for one torch release (and CUDA or not). This picks
# the torchaudio of the installed torch's minor version, installs it without dependencies (so
# pip never replaces torch), and uninstalls it again if it does not import: mmmod never needs
# it (the demo falls back to a pure-torch log-mel, and reads WAV with soundfile).
#
#   TORCHAUDIO_VERSION=X.Y.Z    install that version instead of the matching one
#   TORCHAUDIO_STRIP_NATIVE=1   when it does not import, delete its native libraries instead of
#                               uninstalling it: its Python transforms (MelSpectrogram, ...) are
#                               pure torch. Used on the CI machines, where PyPI's only torchaudio
#                               near their CPU torch 2.13 is 2.11's CUDA build.
# Usage: bash scripts/install_torchaudio.sh      (PYTHON=... picks the interpreter)
set -euo pipefail
PY=${PYTHON:-python}

if "$PY" -c "import torchaudio.transforms" 2>/dev/null; then
    echo "torchaudio already importable: $("$PY" -c 'import torchaudio; print(torchaudio.__version__)')"
    exit 0
fi
TORCH_MINOR=$("$PY" -c "import torch; print('.'.join(torch.__version__.split('+')[0].split('.')[:2]))")
SPEC="torchaudio==${TORCHAUDIO_VERSION:-$TORCH_MINOR.*}"
if ! "$PY" -m pip install -q --no-deps "$SPEC"; then
    echo "torchaudio: no $SPEC to install for torch $TORCH_MINOR; skipped (mmmod does not need it)"
    exit 0
fi
if ! "$PY" -c "import torchaudio.transforms" 2>/dev/null; then
    if [ "${TORCHAUDIO_STRIP_NATIVE:-0}" = 1 ]; then
        TA_DIR=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torchaudio').origin))")
        rm -f "$TA_DIR"/lib/*.so
    else
        "$PY" -m pip uninstall -q -y torchaudio
        echo "torchaudio: $SPEC does not load against torch $TORCH_MINOR; uninstalled (mmmod does not need it)"
        exit 0
    fi
fi
"$PY" -c "import torch, torchaudio.transforms as T; x = T.MelSpectrogram(16000, n_mels=8)(torch.zeros(1600)); print('torchaudio', __import__('torchaudio').__version__, 'ok', tuple(x.shape))"

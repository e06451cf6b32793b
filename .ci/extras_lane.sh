#!/usr/bin/env bash
# CI extras lane: mmmod inside the training frameworks (docs/integrations.md), with the pinned
# versions below, in .venv-extras: a venv whose .pth file adds .venv's site-packages as a site
# directory (torch, triton and the editable mmmod of the CPU lane are shared, never reinstalled;
# pip is held to .venv's torch by a constraint). Runs the framework tests: Lightning (automatic,
# accumulation, manual through the proxy, ckpt_path resume, GradScaler skip, 2-process DDP),
# accelerate and the Hugging Face Trainer, and the documented snippets.
# Needs .venv (scripts/setup.sh). Reuses an existing .venv-extras whose pins match.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=$REPO/.venv-extras
PINS=("lightning==2.6.6" "accelerate==1.16.0" "transformers==5.25.0")
START=$(date +%s)
say() { echo "extras_lane [$(( $(date +%s) - START ))s]: $*"; }

[ -x .venv/bin/python ] || { echo "extras_lane: .venv missing: run scripts/setup.sh first" >&2; exit 1; }
BASE_SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
TORCH=$(.venv/bin/python -c "import torch; print(torch.__version__)")
if [ ! -x "$VENV/bin/python" ]; then
    "$(.venv/bin/python -c "import sys; print(sys._base_executable)")" -m venv "$VENV"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# addsitedir, not a plain path line: .venv's own .pth files (the editable mmmod) run too
echo "import site; site.addsitedir('$BASE_SITE')" > "$SITE/base_venv.pth"
CONSTRAINTS=$VENV/constraints.txt
echo "torch==$TORCH" > "$CONSTRAINTS"
# the constraint makes pip fail rather than replace torch
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" "${PINS[@]}"
say "$("$VENV/bin/python" -c "import torch, lightning, accelerate, transformers, mmmod; print('torch', torch.__version__, '| lightning', lightning.__version__, '| accelerate', accelerate.__version__, '| transformers', transformers.__version__, '| mmmod from', mmmod.__file__)" 2>/dev/null)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/integrations/test_integrations_lightning.py \
    tests/integrations/test_integrations_hf.py tests/integrations/test_integrations_docs.py
say "done"

#!/usr/bin/env bash
# Create .venv (or $MMIM_EXT_VENV) with the pinned CPU torch and the development tools, then build
# mmim_ext in place (editable) against that torch. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MMIM_EXT_VENV:-.venv}
PY=${MMIM_EXT_PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch installed above (an isolated build would pull a
# multi-GB CUDA torch). MAX_JOBS bounds the parallel compile on small machines.
MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import mmim_ext, torch; print('mmim_ext', mmim_ext.__version__, '| torch', torch.__version__, '| fused CPU kernel:', mmim_ext.fused_available('cpu'), '(' + torch.ops.mmim_ext.cpu_capability() + ')' if mmim_ext.extension_loaded() else '')"

#!/usr/bin/env bash
# Create .venv when missing and install the pinned requirements, keyed on their hash: a second call installs nothing.
# A CUDA torch already in the system Python is reused (venv with --system-site-packages), never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=torch==2.13.0
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt scripts/bootstrap_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "bootstrap: reusing the CUDA torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_PIN (CPU build where no CUDA torch is present)"
  .venv/bin/python -m pip install -q "$TORCH_PIN"
fi
echo "bootstrap: installing pinned requirements"
.venv/bin/python -m pip install -q -r requirements.txt
echo "$want" > "$stamp"

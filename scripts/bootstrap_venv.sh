#!/usr/bin/env bash
# Create .venv when missing and install the pinned requirements, keyed on their hash: a second call installs
# nothing. A CUDA torch already in the system Python is reused (venv with --system-site-packages), never
# replaced unless asked:
#   TORCH_SPEC       the torch to install when the venv has none (default torch==2.13.0)
#   TORCH_INDEX_URL  the wheel index for it, e.g. https://download.pytorch.org/whl/cu126 (cu126 builds still
#                    carry sm_50-sm_90; CUDA 12.8+/13 builds dropped Volta, so a V100 needs cu126)
#   TORCH_REINSTALL  true: reinstall the venv's torch as TORCH_SPEC from TORCH_INDEX_URL, even when up to date
# Example (the fix make gpu-check names when torch has no kernels for the GPU):
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 TORCH_REINSTALL=true make venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
case "${TORCH_REINSTALL:-false}" in
  true|1|yes|on) reinstall=true ;;
  false|0|no|off|"") reinstall=false ;;
  *) echo "bootstrap: TORCH_REINSTALL=${TORCH_REINSTALL} is not true or false: fix the variable" >&2
     exit 2 ;;
esac
index_args=()
[ -n "$TORCH_INDEX_URL" ] && index_args=(--index-url "$TORCH_INDEX_URL")
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt scripts/bootstrap_venv.sh | sha256sum | cut -d' ' -f1)
if [ "$reinstall" = false ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c "import torch" 2>/dev/null; then
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
if [ "$reinstall" = true ]; then
  echo "bootstrap: reinstalling $TORCH_SPEC from ${TORCH_INDEX_URL:-the default index}"
  .venv/bin/python -m pip install -q --force-reinstall "$TORCH_SPEC" ${index_args[@]+"${index_args[@]}"}
elif ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "bootstrap: installing $TORCH_SPEC from ${TORCH_INDEX_URL:-the default index}" \
       "(CPU build where no CUDA torch is present)"
  .venv/bin/python -m pip install -q "$TORCH_SPEC" ${index_args[@]+"${index_args[@]}"}
fi
echo "bootstrap: installing pinned requirements"
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -c "import torch; print('bootstrap: torch', torch.__version__, 'CUDA', torch.version.cuda, \
'built for', ' '.join(torch.cuda.get_arch_list()) or '(no CUDA device visible)')" || true
echo "$want" > "$stamp"

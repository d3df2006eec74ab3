#!/usr/bin/env bash
# Create .venv when missing and install the pinned requirements, keyed on their hash: a second call installs
# nothing. A torch already in the system Python is checked first (python -m pipeline.torch_fit: its version
# against the pinned stack's minimum, its CUDA build against the driver, its arches against the GPUs): one that
# fits is reused (venv with --system-site-packages); one that does not stops here with one sentence naming the
# fix for this driver, and is never replaced unless asked:
#   TORCH_AUTO_INSTALL true: install the torch that fits instead of stopping (from the newest PyTorch index the
#                      driver runs, e.g. https://download.pytorch.org/whl/cu118; a V100 gets a build with sm_70)
#   TORCH_SPEC         the torch to install (default torch==2.13.0; an older index gives its newest torch)
#   TORCH_INDEX_URL    the wheel index for a first torch or for TORCH_REINSTALL, e.g. a mirror of .../whl/cu126
#   TORCH_REINSTALL    true: reinstall the venv's torch as TORCH_SPEC from TORCH_INDEX_URL, even when up to date
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST and pip's other variables pass through untouched.
# Example (the fix make gpu-check names when torch has no kernels for the GPU):
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 TORCH_REINSTALL=true make venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
flag() {   # flag NAME VALUE: true or false, or a one-line error naming the variable
  case "$2" in
    true|1|yes|on) echo true ;;
    false|0|no|off|"") echo false ;;
    *) echo "bootstrap: $1=$2 is not true or false: fix the variable" >&2; return 2 ;;
  esac
}
reinstall=$(flag TORCH_REINSTALL "${TORCH_REINSTALL:-false}") || exit 2
auto=$(flag TORCH_AUTO_INSTALL "${TORCH_AUTO_INSTALL:-false}") || exit 2
index_args=()
[ -n "$TORCH_INDEX_URL" ] && index_args=(--index-url "$TORCH_INDEX_URL")
# the torch check (pipeline/torch_fit.py) gets the version to install, a first torch's index, TORCH_AUTO_INSTALL
fit_args=(--pin "${TORCH_SPEC#torch==}" ${index_args[@]+"${index_args[@]}"})
[ "$auto" = true ] && fit_args+=(--auto)
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt scripts/bootstrap_venv.sh pipeline/torch_fit.py | sha256sum | cut -d' ' -f1)
if [ "$reinstall" = false ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && .venv/bin/python -c "import torch" 2>/dev/null; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  site=()
  if [ "$reinstall" = false ] && "$PY" -c "import torch" 2>/dev/null; then
    fit=0
    "$PY" -m pipeline.torch_fit --plan-only "${fit_args[@]}" || fit=$?
    case "$fit" in
      0) site=(--system-site-packages) ;;   # it fits: the venv sees and reuses it
      3) ;;                                 # TORCH_AUTO_INSTALL=true: the venv gets a torch of its own
      *) exit "$fit" ;;                     # it does not fit: the sentence is out, nothing was created
    esac
  fi
  "$PY" -m venv ${site[@]+"${site[@]}"} .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$reinstall" = true ]; then
  echo "bootstrap: reinstalling $TORCH_SPEC from ${TORCH_INDEX_URL:-the default index}"
  .venv/bin/python -m pip install -q --force-reinstall "$TORCH_SPEC" ${index_args[@]+"${index_args[@]}"}
fi
# the venv's torch: checked; installed when there is none (or TORCH_AUTO_INSTALL=true); its version is then pinned
# for the requirements below, so pip cannot swap it for another build on the way
rm -f .venv/torch-constraint.txt
.venv/bin/python -m pipeline.torch_fit "${fit_args[@]}" --constraint .venv/torch-constraint.txt
constraint=()
[ -s .venv/torch-constraint.txt ] && constraint=(-c .venv/torch-constraint.txt)
echo "bootstrap: installing pinned requirements"
.venv/bin/python -m pip install -q -r requirements.txt ${constraint[@]+"${constraint[@]}"}
.venv/bin/python -c "import torch; print('bootstrap: torch', torch.__version__, 'CUDA', torch.version.cuda, \
'built for', ' '.join(torch.cuda.get_arch_list()) or '(no CUDA device visible)')" || true
echo "$want" > "$stamp"

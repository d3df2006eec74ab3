#!/usr/bin/env bash
# The GPU self-test on a lent, offline GPU machine (no hub, no .venv): python3 -m pipeline run gpu_selftest on
# a random-init Qwen2.5-7B-shaped model (MODEL_NAME=random-init) in bf16, then QLoRA nf4, then an fp16 plan.
#   bash scripts/device_selftest.sh                   (OUT=<folder> for the figures; docs/GPU_SELFTEST.md)
#   SELFTEST_PLANS="bf16 nf4" SELFTEST_BUDGET_S=420 bash scripts/device_selftest.sh
# Wheels in .whl/ (trl, datasets, bitsandbytes and the few pure-python packages the machine lacks) are
# installed into $SELFTEST_SITE, skipping any distribution the machine already has. Writes to $OUT (flat, at
# most 8 files): gpu_selftest_<plan>.json per plan, summary.txt, environment.txt, selftest.log (log tails).
# Exit status: 0 iff every plan that ran has status ok.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SITE=${SELFTEST_SITE:-/tmp/site}
PLANS=${SELFTEST_PLANS:-bf16 nf4 fp16}
BUDGET=${SELFTEST_BUDGET_S:-540}   # the device's 10-minute command limit, with room for the summary
SCRATCH=$(mktemp -d)
mkdir -p "$OUT"
log() { echo "[device_selftest] $*" | tee -a "$OUT/selftest.log"; }

# 1. wheels: only distributions the machine does not have, so the image's numpy, torch and transformers stay
if compgen -G ".whl/*.whl" >/dev/null; then
  mapfile -t wheels < <($PY - .whl/*.whl <<'EOF'
import sys
from importlib import metadata
for whl in sys.argv[1:]:
    name = whl.rsplit("/", 1)[-1].split("-")[0]
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(whl)
EOF
)
  log "installing ${#wheels[@]} wheel(s) into $SITE: ${wheels[*]:-none}"
  if [ "${#wheels[@]}" -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" || { log "pip install failed: see above"; exit 2; }
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. what is there: versions of everything the stage imports, the GPU, and whether 4-bit loads
$PY - >"$OUT/environment.txt" 2>&1 <<'EOF'
import importlib, subprocess
from importlib import metadata
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes",
             "huggingface_hub", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "jsonschema", "rich",
             "python-dotenv", "yaml"):
    try:
        print(f"{name} {metadata.version('PyYAML' if name == 'yaml' else name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} MISSING")
for mod in ("trl", "datasets", "bitsandbytes", "peft", "jsonschema", "dotenv", "rich",
            "pipeline.stages.gpu_selftest"):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # noqa: BLE001
        print(f"import {mod}: FAILED {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_arch_list())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.mem_get_info())
smi = __import__("shutil").which("nvidia-smi")
print(subprocess.run([smi], capture_output=True, text=True).stdout if smi else "no nvidia-smi")
EOF
cat "$OUT/environment.txt" | tee -a "$OUT/selftest.log"

# 3. one pipeline run per plan, each in its own output root; the tiny tokenizer is built once, in a shared cache
export MODEL_TIER=${SELFTEST_TIER:-7b} MODEL_NAME=${SELFTEST_MODEL-random-init} HF_HUB_OFFLINE=1 \
       PYTHONUNBUFFERED=1 MEDLLM_CACHE=$SCRATCH/cache ENABLE_LLM_JUDGE=false ENABLE_LLM_RISK_JUDGE=false
[ -n "$MODEL_NAME" ] || unset MODEL_NAME
rc_all=0
for plan in $PLANS; do
  left=$((BUDGET - SECONDS))
  if [ "$left" -lt 90 ]; then log "$plan: not run, ${left}s of the budget left"; continue; fi
  root=$SCRATCH/$plan
  mkdir -p "$root"
  extra=()
  case $plan in
    nf4) extra=(QLORA=true) ;;
    fp16)   # the live GPU reported as sm_75 (no bf16): gpu_check plans fp16 from this recorded probe
      $PY - "$root/probe_fp16.json" <<'EOF'
import json, shutil, subprocess, sys, torch
if not torch.cuda.is_available():
    sys.exit(3)
free, total = torch.cuda.mem_get_info()
smi = shutil.which("nvidia-smi")
driver = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                        text=True).stdout.split("\n")[0].strip() if smi else ""
arch = torch.cuda.get_arch_list()
probe = {"note": "the live GPU reported as sm_75 (no bf16) for an fp16 plan; sm_75 is added to the arch list "
                 "so the plan does not refuse it: the kernels that run are the live GPU's",
         "devices": [{"name": f"{torch.cuda.get_device_name(0)} (as sm_75)", "capability": [7, 5],
                      "total_gb": round(total / 2**30, 2), "free_gb": round(free / 2**30, 2)}],
         "driver": driver or "unknown", "cuda_runtime": torch.version.cuda or "unknown",
         "torch_version": torch.__version__, "torch_arch_list": arch + ([] if "sm_75" in arch else ["sm_75"]),
         "flash_attn": False, "bitsandbytes": False}
json.dump(probe, open(sys.argv[1], "w"), indent=2)
EOF
      [ $? = 0 ] || { log "fp16: not run, the fp16 plan needs a CUDA device"; continue; }
      extra=(GPU_PROBE_FILE="$root/probe_fp16.json") ;;
  esac
  limit=$((left - 30 < 330 ? left - 30 : 330))
  log "$plan: python -m pipeline run gpu_selftest (${extra[*]:-no extra env}), limit ${limit}s"
  env PIPELINE_ROOT="$root" "${extra[@]}" timeout --kill-after=15 "$limit" \
    $PY -m pipeline run gpu_selftest --force >"$root/run.log" 2>&1
  rc=$?
  log "$plan: exit $rc"
  tail -n 60 "$root/run.log" >>"$OUT/selftest.log"
  cp "$root/reports/migration/gpu_selftest.json" "$OUT/gpu_selftest_$plan.json" 2>/dev/null \
    || log "$plan: no evidence written (see selftest.log)"
  [ "$rc" = 0 ] || rc_all=1
done

# 4. the figures, one row per plan and trainer
$PY - "$OUT" $PLANS <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out, plans = Path(sys.argv[1]), sys.argv[2:]
print("plan  trainer  ok  precision/quant  len x batch  tokens/s  peak GB (reserved+context / allocated)  "
      "estimate GB (total / parts)  ratios  failed")
for plan in plans:
    f = out / f"gpu_selftest_{plan}.json"
    if not f.is_file():
        print(f"{plan}: no evidence")
        continue
    d = json.loads(f.read_text())
    p = d.get("plan") or {}
    print(f"{plan}: status {d['status']}, device {d.get('device')}, "
          f"model {(d.get('model') or {}).get('name')}, {d.get('reason') or ''}")
    if plan == "fp16" and d.get("device") == "cuda" and p.get("precision") != "fp16":
        print(f"  fp16 asked, the plan is {p.get('precision')}: gpu_check did not plan from GPU_PROBE_FILE")
    if plan == "nf4" and d.get("device") == "cuda" and p.get("quantization") != "nf4":
        print("  nf4 asked, the plan has none: bitsandbytes did not import (environment.txt)")
    for k, r in (d.get("trainers") or {}).items():
        m, c = r.get("memory") or {}, r.get("memory_vs_estimate") or {}
        bad = [n for n, ok in (r.get("invariants") or {}).items() if not ok]
        print(f"  {k:6} {'ok' if r.get('ok') else 'NO':3} {p.get('precision')}/{p.get('quantization')} "
              f"{r.get('max_length')}x{r.get('per_device_batch')} {(r.get('speed') or {}).get('tokens_per_s')} "
              f"{c.get('measured_reserved_plus_context_gb')}/{m.get('peak_allocated_gb')} "
              f"{c.get('estimate_total_gb')}/{c.get('estimate_parts_gb')} "
              f"{c.get('total_ratio')}/{c.get('parts_ratio')} {r.get('error') or ','.join(bad)}")
EOF
rm -rf "$SCRATCH"
exit "$rc_all"

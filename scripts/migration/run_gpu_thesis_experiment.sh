#!/usr/bin/env bash
# The thesis experiment as its own entry.
#   DRY_RUN=true bash scripts/migration/run_gpu_thesis_experiment.sh   configs, data, tokenizer, chat template, memory plan; trains nothing
#   bash scripts/migration/run_gpu_thesis_experiment.sh                make gpu-run (SFT -> DPO/SimPO/KTO -> eval -> judges -> reports)
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s venv
# DRY_RUN is parsed by pipeline.settings like every flag (true/false/1/0/yes/no; anything else is an error)
dry=$(.venv/bin/python -m pipeline day1 flag DRY_RUN)
if [ "$dry" = true ]; then
  exec env DRY_RUN=true .venv/bin/python -m pipeline run dry_run   # the same dry run as day1_run.sh step 5
fi
exec make -s gpu-run

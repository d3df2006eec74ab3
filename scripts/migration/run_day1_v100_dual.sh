#!/usr/bin/env bash
# Day-1 on 2x V100 32 GB: the settings of configs/runtime/v100_dual_32g.env, then day1_run.sh.
#   bash scripts/migration/run_day1_v100_dual.sh        (make day1-v100-dual)
# A variable you export yourself wins over the file (MODEL_TIER=14b bash scripts/migration/run_day1_v100_dual.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
yours=$(export -p)                                          # what the caller exported ...
set -a; source configs/runtime/v100_dual_32g.env; set +a    # ... the template ...
eval "$yours"                                               # ... and the caller's values back on top
# REHEARSAL=true make day1-v100-dual: the same Day-1 on the CPU, planned from the recorded 2x V100 probe
if [ "${REHEARSAL:-false}" = true ] && [ -z "${GPU_PROBE_FILE:-}" ]; then export GPU_PROBE_FILE=configs/probes/v100x2_32g.json; fi
exec bash day1_run.sh

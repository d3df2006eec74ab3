#!/usr/bin/env bash
# Day-1 on a rented GPU: sync, key check, GPU probe, bootstrap, check, dry run, run, strict gate, summary.
#   bash day1_run.sh                      the whole day (MODEL_TIER defaults to 7b through configs/base.yaml)
#   DAY1_DRY_RUN=true bash day1_run.sh    up to and including the dry run; trains nothing
#   BRANCH=my-branch bash day1_run.sh     first fast-forwards the checkout to origin/my-branch
# Each step's output goes to reports/logs/day1_<step>.log; reports/migration/day1_run_summary.md is always written.
# Exit status: the gate's (0 iff strict_pass); for a dry run, 0 iff the dry run passed.
set -uo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
RUN_DIR=${DAY1_RUN_DIR:-$(mktemp -d)}   # step records (and the first logs, until the output root is known)
mkdir -p "$RUN_DIR"   # DAY1_RUN_DIR may name a folder that does not exist yet
STEPS=$RUN_DIR/steps.jsonl   # one JSON object per step (python -m pipeline day1 summary reads it)
ALL_STEPS="sync venv keys gpu-probe gpu-bootstrap gpu-check preflight dry-run gpu-selftest gpu-run gpu-complete-check"
LOGS=$RUN_DIR

json_str() {  # a bash string as a JSON string
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

record() {  # record NAME STATUS RC SECONDS LOG NOTE: one JSON line in $STEPS (RC empty: null)
  printf '{"name": %s, "status": %s, "rc": %s, "seconds": %s, "log": %s, "note": %s}\n' "$(json_str "$1")" \
    "$(json_str "$2")" "${3:-null}" "${4:-0}" "$(json_str "$5")" "$(json_str "$6")" >> "$STEPS"
}

step() {  # step NAME CMD...: run CMD, tee its output to the step log, record status/exit/seconds; returns CMD's exit
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== day1 step: $name"
  "$@" 2>&1 | tee "$LOGS/day1_$name.log"
  rc=${PIPESTATUS[0]}
  record "$name" "$([ "$rc" = 0 ] && echo ok || echo failed)" "$rc" "$((SECONDS - t0))" "day1_$name.log" ""
  return "$rc"
}

not_run() {  # not_run WHY STEP...: record the steps that will not run and why
  local why=$1
  shift
  for s in "$@"; do record "$s" skipped "" 0 "" "$why"; done
}

sync_branch() {  # fetch + checkout + pull --ff-only; refuse on a dirty tree or a diverged branch
  local remote
  remote=$(git remote | head -n1)
  if [ -z "$remote" ]; then echo "BRANCH=$BRANCH but this checkout has no git remote: nothing to sync"; return 0; fi
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "the working tree has uncommitted changes (git status): commit or stash them, or unset BRANCH"; return 1
  fi
  git fetch "$remote" "$BRANCH" || { echo "git fetch $remote $BRANCH failed: check the branch name and the network"; return 1; }
  git checkout "$BRANCH" || { echo "git checkout $BRANCH failed"; return 1; }
  git pull --ff-only "$remote" "$BRANCH" || {
    echo "local $BRANCH has diverged from $remote/$BRANCH: reconcile it by hand (git log --oneline --graph --all), then re-run"
    return 1; }
}

key_check() {  # which enabled judge flags fail without a key; a smoke run without a key turns the judges off
  local rc
  $PY -m pipeline day1 keys
  rc=$?
  if [ "$rc" = 3 ]; then touch "$RUN_DIR/no_key"; return 0; fi
  return "$rc"
}

gpu_probe() {  # informative only: the plan itself comes from make gpu-check
  if command -v nvidia-smi >/dev/null && nvidia-smi -L; then nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv
  else echo "no GPU: nvidia-smi not found or no device (GPU tiers will be skipped with evidence)"; fi
}

adopt_root() {  # move the step logs to <output root>/reports/logs once Python can say where the root is
  local root
  root=$($PY -m pipeline day1 root 2>/dev/null) || return 1
  mkdir -p "$root/reports/logs" && mv "$LOGS"/day1_*.log "$root/reports/logs/" 2>/dev/null
  LOGS=$root/reports/logs
}

finish() {  # finish EXIT [WHY]: record the steps that did not run, write the summary (always), exit with EXIT
  local dry=() s
  for s in $ALL_STEPS; do
    grep -qF "{\"name\": \"$s\"," "$STEPS" 2>/dev/null || not_run "${2:-not run: an earlier step failed}" "$s"
  done
  [ "${DRY:-false}" = true ] && dry=(--dry-run)
  [ "$LOGS" != "$RUN_DIR" ] || [ ! -x "$PY" ] || adopt_root
  if [ -x "$PY" ]; then
    $PY -m pipeline day1 summary "$STEPS" "${dry[@]}" || echo "day1: could not write the summary: see above"
  else
    echo "day1: no .venv, so no summary file; step logs are in $LOGS; steps:"; cat "$STEPS"
  fi
  [ "$RUN_DIR" = "$LOGS" ] || rm -rf "$RUN_DIR"
  exit "$1"
}

main() {
  # 1. branch sync; after a pull that moved HEAD, re-run the (possibly updated) script, keeping the step records
  if [ -n "${BRANCH:-}" ] && [ -z "${DAY1_SYNCED:-}" ]; then
    before=$(git rev-parse HEAD)
    step sync sync_branch || finish 1 "not run: the branch sync failed"
    [ "$(git rev-parse HEAD)" = "$before" ] || exec env DAY1_SYNCED=1 DAY1_RUN_DIR="$RUN_DIR" bash "$0"
  elif [ -z "${BRANCH:-}" ]; then
    not_run "BRANCH is not set" sync
  fi

  # 2. the venv (no-op when up to date), then the output root and the .env/key check, both read by pipeline.settings
  step venv make -s venv || finish 1
  adopt_root || finish 2
  DRY=$($PY -m pipeline day1 flag DAY1_DRY_RUN) || finish 2
  SMOKE=$($PY -m pipeline day1 flag DAY1_SMOKE) || finish 2
  step keys key_check || finish 2 "not run: config error (see day1_keys.log)"
  if [ -f "$RUN_DIR/no_key" ] && [ "$SMOKE" = true ]; then   # pipeline.settings decides this in every shell alike
    echo "day1: smoke run without OPENAI_API_KEY: the LLM judges are off and the LLM answer fallback is unavailable"
  fi

  # 3. GPU probe
  step gpu-probe gpu_probe

  # 4-5. environment, hardware plan, dry run: a failure here means training cannot start, so stop
  step gpu-bootstrap make -s gpu-bootstrap || finish 1 "not run: gpu-bootstrap failed"
  step gpu-check make -s gpu-check || finish 1 "not run: gpu-check failed (no hardware plan)"
  # the preflight before the dry run: measured memory and speed per stage, the timeline the dry run prints; over
  # BUDGET it stops here, before anything trains (the engine skips it on a tier that does not ask for it)
  if [ "$DRY" = true ]; then
    not_run "DAY1_DRY_RUN=true: the preflight trains a few measured steps (make preflight runs it)" preflight
  else
    step preflight $PY -m pipeline run preflight \
      || finish 1 "not run: the preflight failed or the run is over BUDGET (see reports/migration/preflight.json)"
  fi
  step dry-run env DRY_RUN=true $PY -m pipeline run dry_run
  dry_rc=$?
  [ "$DRY" = true ] && finish "$dry_rc" "not run: DAY1_DRY_RUN=true, nothing is trained"
  [ "$dry_rc" = 0 ] || finish "$dry_rc" "not run: the dry run failed (see reports/migration/dry_run.json)"
  # a few steps of each trainer on the real model first: a crash or a broken invariant costs minutes here, not hours
  # (on a CUDA machine only: on a CPU, a rehearsal's own training stages are that check; make gpu-selftest still runs)
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    step gpu-selftest make -s gpu-selftest || finish 1 "not run: the GPU self-test failed (reports/migration/gpu_selftest.json)"
  else
    not_run "no CUDA device: the self-test runs on a GPU (make gpu-selftest runs it on the stand-in)" gpu-selftest
  fi

  # 6. the experiment; the gate runs even after a failure, to say which stage failed and why
  step gpu-run make -s gpu-run

  # 7. the strict gate decides the exit status
  step gpu-complete-check make -s gpu-complete-check
  finish $?
}

main "$@"; exit $?   # the whole file is parsed before it runs, so a pull that rewrites it cannot break this run

# MedLLM Day-1. Each target is one call; the Python side decides what is already done.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: help venv test test-slow test-fast day1-smoke gpu-bootstrap gpu-check dry-run gpu-run gpu-complete-check \
        gpu-selftest preflight day1-v100-dual rehearse bench soak export-merged export verify-export chat ls prune

help:                ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed 's/:.*## /\t/'

venv:                ## create .venv and install the pinned requirements (no-op when up to date)
	@bash scripts/bootstrap_venv.sh

test: venv           ## the whole test suite on the tiny tier (CPU, no hub access)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

test-slow: venv      ## the bench and soak smoke runs (a few minutes; CI runs them after make test)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests

test-fast: venv      ## unit tests only
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/unit

day1-smoke: venv     ## the whole Day-1 on a CPU with the demo tier (judges off unless a key is configured)
	MODEL_TIER=demo DAY1_SMOKE=true bash day1_run.sh

gpu-bootstrap: venv  ## environment, imports, cache folders, disk -> reports/migration/gpu_bootstrap.json
	$(PY) -m pipeline run gpu_bootstrap --force

gpu-check: venv      ## hardware probe and the one plan -> reports/migration/gpu_check.json
	$(PY) -m pipeline run gpu_check --force

gpu-selftest: venv   ## each trainer, a few steps at the longest length/batch -> reports/migration/gpu_selftest.json
	$(PY) -m pipeline run gpu_selftest --force

preflight: venv      ## a few measured steps of each trainer -> predicted timeline, cost, BUDGET check -> reports/migration/preflight.json
	$(PY) -m pipeline run preflight --force preflight.enabled=true

dry-run: venv        ## configs, data, tokenizer, chat template, memory plan; trains nothing
	DRY_RUN=true $(PY) -m pipeline run all

gpu-run: venv        ## SFT -> DPO, SimPO, KTO -> eval -> judges -> reports (finished stages are skipped)
	$(PY) -m pipeline run all

gpu-complete-check: venv  ## the strict checker; exit 0 iff strict_pass
	$(PY) -m pipeline check

day1-v100-dual: venv ## Day-1 on 2x V100 32 GB (configs/runtime/v100_dual_32g.env)
	bash scripts/migration/run_day1_v100_dual.sh

rehearse: venv       ## a GPU tier's exact Day-1 on the CPU: make rehearse PROBE=configs/probes/v100x2_32g.json TIER=7b
	REHEARSAL=true GPU_PROBE_FILE="$(PROBE)" MODEL_TIER="$(or $(TIER),7b)" bash day1_run.sh

bench: venv          ## benchmarks -> reports/bench/
	$(PY) -m scripts.bench

soak: venv           ## survival under faults -> reports/soak/
	$(PY) -m scripts.soak

export-merged: venv  ## merge each trained adapter into the base, check it answers alike -> checkpoints/<variant>/merged
	$(PY) -m pipeline run export_merged

export: venv         ## one archive of reports/, every checkpoints/*/final and each merged folder that passed its parity check, with a sha256 manifest
	$(PY) -m scripts.export pack

chat: venv           ## talk to a variant: make chat VARIANT=sft; PROMPT="..." answers once and exits (SYSTEM_PROMPT, MAX_NEW_TOKENS, MERGED)
	$(PY) -m pipeline chat   # VARIANT, PROMPT, ... reach it through the environment (make exports them)

verify-export: venv  ## check an archive against its manifest: make verify-export FILE=...
	$(PY) -m scripts.export verify "$(FILE)"

ls: venv             ## stages in order with their status
	$(PY) -m pipeline ls

prune: venv          ## delete checkpoint folders kept aside for other configs (*.stale-<fingerprint>); says what it frees
	$(PY) -m pipeline prune

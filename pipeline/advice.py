"""What to do about a failed check of the gate: a table keyed by code. A check's code is the one its stage
raised (core.SkipStage/StageFailed(code=...), recorded by the engine as `reason_code`), else the kind of check
(the tail of its id: "curve", "from_sft", ...); never a substring of a message."""
from __future__ import annotations

REDO = "re-run it: `python -m pipeline run {stage} --force` (then `make gpu-run` for the stages after it)"
ADVICE = {   # code -> what to do; a check's code is the one its stage raised, else its kind (the id's tail)
    "blocked": "fix {blocked_by} first",
    "upstream_failed": "fix the failing checks of {upstream} first: this stage depends on them; `make gpu-run` "
                       "then re-runs it by itself",
    "skip_forced": "FORCE_SKIP_TRAINING is on: unset it (or set it to false in .env) and run `make gpu-run`",
    "no_cuda": "training was skipped for lack of CUDA: run on a GPU with at least {var} GB free (see "
               "reports/migration/gpu_check.json), or use MODEL_TIER=demo for a CPU smoke run",
    "too_little_memory": "training was skipped for lack of GPU memory: run on a GPU with at least {var} GB free "
                         "(see reports/migration/gpu_check.json), or use MODEL_TIER=demo for a CPU smoke run",
    "infeasible_plan": "the hardware plan cannot train this tier here: follow plan.feasible_reason in "
                       "reports/migration/gpu_check.json, or use MODEL_TIER=demo for a CPU smoke run",
    "oom": "CUDA ran out of memory at the smallest batch: shorten max_length, set QLORA=true or use a bigger "
           "GPU, then " + REDO,
    "undeclared_read": "a pipeline defect: stage {stage} read something it does not declare (see the detail); "
                       "report it with reports/logs/{stage}_full.log",
    "metrics": "the evidence is missing, not ok, or not this stage's own: read reports/logs/{stage}_full.log and "
               + REDO,
    "checkpoint": "the final checkpoint is missing or changed since training (never edit it): " + REDO,
    "loads": "the checkpoint does not load or generate: read the error above, check the base model is reachable "
             "(MODEL_NAME, HF cache), then " + REDO,
    "curve": "no real loss curve (never edit metrics files): " + REDO,
    "steps": "training stopped before its plan: look for OOM retries or an interruption in "
             "reports/logs/{stage}_full.log, then " + REDO,
    "base_model": "the stage trained another base model than the config names: check MODEL_TIER/MODEL_NAME, "
                  "then " + REDO,
    "from_sft": "the SFT final changed after {stage} trained on it: " + REDO,
    "reference": "the reference {stage} compared against is not the SFT final on disk (or the metrics predate "
                 "the field): " + REDO,
    "reference_mismatch": "TRL's reference was not the frozen SFT adapter (read the reason: a base-model "
                          "fallback or another adapter); check `pip show trl peft` and {stage}.trl, then " + REDO,
    "invariants": "the metrics predate these fields, or the trainer broke an invariant: " + REDO + "; if it "
                  "breaks again, report it with reports/logs/{stage}_full.log (a pipeline defect)",
    "evidence_root": "evidence or a final changed after the thesis material quoted the root hash (never edit "
                     "them): `python -m pipeline run reports --force` quotes the root as it is now",
    "coverage": "run `python -m pipeline run eval --force` once every training stage is ok",
    "loglik_task": "the loglik protocol's lm-eval task definitions (pipeline/evalsets/lm_eval_tasks/) do not read "
                   "the configured eval files as the sets' loaders do (see the reason): fix the task YAML or the "
                   "data path, then `python -m pipeline run eval --force`",
    "pairwise": "set OPENAI_API_KEY (and OPENAI_BASE_URL) in .env, or set ENABLE_LLM_JUDGE=false; then "
                "`python -m pipeline run judge --force`",
    "risk": "set OPENAI_API_KEY (and OPENAI_BASE_URL) in .env, or set ENABLE_LLM_RISK_JUDGE=false; then "
            "`python -m pipeline run judge --force`",
    "no_incomplete": "a stage was interrupted: run `make gpu-run` again (it resumes), then "
                     "`make gpu-complete-check`",
    "fresh": "run `make gpu-run`: it redoes exactly the stages whose config, data or upstream changed",
    "stages": "read reports/logs/<stage>_full.log of each stage named above, fix the cause, then run "
              "`make gpu-run` again",
}


def advice(cfg, check: dict, upstream_failed: list[str] = ()) -> str:
    """What to do next for a failing check: blocked > the code it carries > a failing upstream > its kind."""
    stage, kind = check["id"].split(".", 1)
    code = ("blocked" if check.get("blocked_by") else check.get("code") if check.get("code") in ADVICE
            else "upstream_failed" if upstream_failed else kind)
    var = "MIN_CUDA_MEM_GB_14B" if cfg.tier == "14b" else "MIN_CUDA_MEM_GB_7B"
    return (ADVICE.get(code) or REDO).format(stage=stage, var=var, blocked_by=check.get("blocked_by"),
                                             upstream=", ".join(upstream_failed))

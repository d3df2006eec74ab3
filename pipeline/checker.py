"""The strict completion gate and thesis readiness, recomputed from the files on disk every time.

Run: python -m pipeline check          (make gpu-complete-check; exit 0 iff strict_pass)
     python -m pipeline.checker keys   (day1_run.sh: which enabled judge flags need a key; never prints it)
     python -m pipeline.checker summary STEPS.tsv [--dry-run]   (day1_run.sh: the Day-1 summary)
Nothing is read back from an earlier verdict: no `strict_pass` or `passed` is ever taken from a file.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pipeline import evidence as ev
from pipeline.settings import GPU_TIERS, Config

TRAIN = ("sft", "dpo", "simpo", "kto")
GATE = "reports/migration/gpu_completion_check.json"
READINESS = "reports/thesis_support/thesis_readiness.json"
SUMMARY = "reports/migration/day1_run_summary.json"
CPU_PLAN = {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "quantization": None}
PROBE_PROMPT = "Which organ pumps blood through the human body? Answer in one word."
PROBE_TOKENS = 4
ARTIFACTS = ("reports/eval_default.md", "reports/sota_compare.md", "reports/error_analysis.md",
             "reports/thesis_support/thesis_draft_material.md", "reports/thesis_support/experiment_record.json")
JUDGES = (("pairwise", "enabled", "ENABLE_LLM_JUDGE"), ("risk", "risk_enabled", "ENABLE_LLM_RISK_JUDGE"))


def _result(id_: str, problems: list[str], ok_detail: str, evidence: str, blocked_by: str | None = None) -> dict:
    out = {"id": id_, "passed": not problems, "detail": "; ".join(problems) if problems else ok_detail,
           "evidence": evidence}
    if blocked_by:
        out["blocked_by"] = blocked_by
    return out


def _blocked(id_: str, by: str, why: str, evidence: str) -> dict:
    return _result(id_, [f"not checked: {why}"], "", evidence, blocked_by=by)


def evidence_path(cfg: Config, stage: str) -> str:
    from pipeline.stages import REGISTRY
    return REGISTRY[stage].evidence(cfg)


def checkpoint_path(cfg: Config, stage: str) -> str:
    """Where CONTRACT.md puts each final checkpoint."""
    return f"checkpoints/layer_b/{cfg.slug}_sft/final" if stage == "sft" else f"checkpoints/{stage}-real-baseline/final"


def expected_base(cfg: Config) -> str:
    """The base model the config names, computed without building or downloading anything."""
    from pipeline.models import base_for
    try:
        return base_for(cfg, build=False)   # in a rehearsal, the stand-in
    except ValueError as exc:   # a MODEL_NAME that names nothing: the base_model check reports it
        return str(exc)


def _same_model(a, b) -> bool:
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def probe_plan(root: Path) -> dict:
    """The plan the run executed (gpu_check's run_plan in a rehearsal, else its plan) where it is a CUDA plan or
    a rehearsal's CPU one (the tier's precision and quantization), else the CPU plan."""
    check = ev.read_json(root / "reports/migration/gpu_check.json") or {}
    plan = check.get("run_plan") or check.get("plan") or {}
    if plan.get("rehearsal"):
        return {k: plan.get(k) for k in (*CPU_PLAN, "rehearsal")}
    if plan.get("device") == "cuda":
        return {k: plan.get(k) for k in CPU_PLAN}
    return dict(CPU_PLAN)


def probe_checkpoint(vs, base: str, adapter_dir) -> tuple[bool, str]:
    """Load the final checkpoint on its base model (vs: the gate's variants.Variants, which keeps one base
    loaded for every probe) and greedily generate a few tokens: (ok, text or error)."""
    try:
        import torch
        from pipeline.variants import generation_config
        adapter_dir = Path(adapter_dir)
        if (adapter_dir / "adapter_config.json").is_file():
            model, tok = vs.load(base, adapter_dir, "probe")
        else:   # a full model folder is its own base
            model, tok = vs.load(adapter_dir)
        text = (tok.apply_chat_template([{"role": "user", "content": PROBE_PROMPT}], tokenize=False,
                                        add_generation_prompt=True) if tok.chat_template else PROBE_PROMPT)
        enc = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template).to(model.device)
        config = generation_config(model, tok, PROBE_TOKENS, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        new = out.sequences[0, enc["input_ids"].shape[1]:]
        if len(new) == 0:
            return False, "generated no token"
        if not all(torch.isfinite(s).any() for s in out.scores):
            return False, "generation produced non-finite logits (NaN/inf weights)"
        return True, tok.decode(new, skip_special_tokens=False)
    except Exception as exc:  # noqa: BLE001 - the check reports any load/generate error as its detail
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# --- training stages ----------------------------------------------------------------------------------
def _check_metrics(cfg: Config, stage: str, doc, rel: str) -> dict:
    if not isinstance(doc, dict):
        return _result(f"{stage}.metrics", [f"{rel} is missing or not valid JSON: the stage never finished"], "", rel)
    problems = []
    if doc.get("stage") != stage:
        problems.append(f"{rel} holds evidence of stage {doc.get('stage')!r}, not {stage!r} (a copied file?)")
    if doc.get("status") != "ok":
        problems.append(f"status is {doc.get('status')!r}: {doc.get('reason') or 'no reason recorded'}")
    if doc.get("status") == "ok" and doc.get("skipped") is not False:
        problems.append(f"skipped is {doc.get('skipped')!r}, expected false")
    errors = ev.validate(stage, doc)
    if errors:
        problems.append(f"does not match its schema ({len(errors)} error(s)): {errors[0]}")
    if doc.get("model_tier") != cfg.tier:
        problems.append(f"trained for tier {doc.get('model_tier')!r} but the config says {cfg.tier!r}")
    return _result(f"{stage}.metrics", problems, f"{rel} is valid, status ok, tier {cfg.tier}", rel)


def _check_checkpoint(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    root, want = Path(cfg.root), checkpoint_path(cfg, stage)
    recorded = doc.get("checkpoint_files")
    if doc.get("checkpoint_dir") != want:
        return _result(f"{stage}.checkpoint", [f"checkpoint_dir is {doc.get('checkpoint_dir')!r}, expected {want!r}"], "", rel)
    folder = root / want
    if not folder.is_dir():
        return _result(f"{stage}.checkpoint", [f"{want} does not exist"], "", want)
    if not isinstance(recorded, dict) or not recorded:
        return _result(f"{stage}.checkpoint", [f"{rel} records no checkpoint_files"], "", rel)
    now = ev.sha256_tree(folder)
    problems = []
    for label, names in (("missing", sorted(set(recorded) - set(now))), ("extra", sorted(set(now) - set(recorded))),
                         ("changed", sorted(k for k in set(now) & set(recorded) if now[k] != recorded[k]))):
        if names:
            problems.append(f"{label} file(s) in {want}: {', '.join(names[:5])}")
    if doc.get("checkpoint_sha256") != ev.sha256_json(recorded):
        problems.append("checkpoint_sha256 does not match checkpoint_files")
    return _result(f"{stage}.checkpoint", problems, f"{want}: {len(now)} files re-hash to the recorded sha256", want)


def _check_loads(cfg: Config, stage: str, doc: dict, vs) -> dict:
    want = checkpoint_path(cfg, stage)
    base = doc.get("base_model")
    if not base:
        return _result(f"{stage}.loads", ["the metrics record no base_model to load the checkpoint on"], "", want)
    ok, text = probe_checkpoint(vs, base, Path(cfg.root) / want)
    where = f"{vs.plan['device']}/{vs.plan['precision']}"
    if ok:
        return _result(f"{stage}.loads", [], f"{want} loads on {base} ({where}) and generates {text!r}", want)
    return _result(f"{stage}.loads", [f"{want} on {base} ({where}) failed: {text}"], "", want)


def _curve_points(rows) -> list[tuple[float, float]] | None:
    try:
        return [(float(s), float(v)) for s, v in rows]
    except (TypeError, ValueError):
        return None


def _check_curve(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    root, folder = Path(cfg.root), checkpoint_path(cfg, stage)
    state_rel, files = doc.get("trainer_state_file") or "", doc.get("checkpoint_files") or {}
    inner = state_rel[len(folder) + 1:] if state_rel.startswith(folder + "/") else None
    curve = _curve_points(doc.get("loss_curve") or [])
    problems = []
    if inner is None or inner not in files:
        problems.append(f"trainer_state_file {state_rel!r} is not one of the hashed files of {folder}")
    elif not (root / state_rel).is_file():
        problems.append(f"{state_rel} is missing")
    else:
        sha = ev.sha256_file(root / state_rel)
        if not (sha == doc.get("trainer_state_sha256") == files[inner]):
            problems.append(f"{state_rel} does not hash to the recorded trainer_state_sha256")
        state = ev.read_json(root / state_rel) or {}
        logged = _curve_points([[e.get("step"), e["loss"]] for e in state.get("log_history", []) if "loss" in e])
        same = (curve is not None and logged is not None and len(curve) == len(logged)
                and all(a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-9)
                        for a, b in zip(curve, logged)))
        if not same:
            problems.append(f"loss_curve does not match the losses in the trainer's own log {state_rel}")
    if curve is None:
        return _result(f"{stage}.curve", problems + ["loss_curve is not a list of [step, loss]"], "", rel)
    finite = [v for _, v in curve if math.isfinite(v)]
    if len(curve) < 3 or len(finite) < len(curve):
        problems.append(f"loss_curve has {len(curve)} points, {len(finite)} finite: need >= 3, all finite")
        return _result(f"{stage}.curve", problems, "", rel)
    k = len(curve) // 3
    first, last = sum(finite[:k]) / k, sum(finite[-k:]) / k
    if not last < first:
        problems.append(f"the loss did not go down (mean of the first third {first:.4f}, of the last third {last:.4f})")
    return _result(f"{stage}.curve", problems,
                   f"{len(curve)} losses match the trainer's own log; mean {first:.4f} (first third) -> {last:.4f} (last)", rel)


def _check_steps(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    train = getattr(cfg, stage)
    planned, step = train.max_steps, doc.get("global_step")
    problems = []
    if step != planned or doc.get("planned_max_steps") != planned:
        problems.append(f"global_step {step} / planned_max_steps {doc.get('planned_max_steps')}, config plans {planned}")
    state = ev.read_json(Path(cfg.root) / (doc.get("trainer_state_file") or "-")) or {}
    if "global_step" in state and state["global_step"] != step:
        problems.append(f"the trainer's own log says global_step {state['global_step']}, the metrics say {step}")
    want = [(c["max_length"], c["until_step"]) for c in train.curriculum]
    got = doc.get("curriculum") or []
    if [(c.get("max_length"), c.get("planned_step")) for c in got] != want:
        problems.append(f"curriculum {got} does not follow the configured plan {train.curriculum}")
    short = [c for c in got if not (isinstance(c.get("reached_step"), int) and c["reached_step"] >= c.get("planned_step", 0))]
    if short:
        problems.append(f"curriculum sub-stage(s) stopped early: {short}")
    return _result(f"{stage}.steps", problems, f"global_step {step} = plan {planned}"
                   + (f"; {len(got)} curriculum sub-stages reached" if got else ""), rel)


def _check_base(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    want = expected_base(cfg)
    ok = _same_model(doc.get("base_model"), want)
    return _result(f"{stage}.base_model", [] if ok else [f"base_model {doc.get('base_model')!r}, config names {want!r}"],
                   f"trained on {want}", rel)


def _check_from_sft(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    sft_dir = checkpoint_path(cfg, "sft")
    start = doc.get("start_checkpoint") or {}
    problems = []
    if start.get("dir") != sft_dir:
        problems.append(f"start_checkpoint.dir is {start.get('dir')!r}, expected the SFT final {sft_dir}")
    folder = Path(cfg.root) / sft_dir
    if not folder.is_dir():
        problems.append(f"the SFT final {sft_dir} is missing")
    elif start.get("checkpoint_sha256") != ev.sha256_json(ev.sha256_tree(folder)):
        problems.append(f"{stage} started from an SFT final that is no longer on disk ({sft_dir} changed since)")
    return _result(f"{stage}.from_sft", problems, f"started from {sft_dir} as it is on disk now (hash match)", rel)


INVARIANT_FIELDS = ("precision.dtype", "precision.trainable_dtype", "memory.max_live_models")
ABSENT = object()


def _field(doc: dict, dotted: str):
    """doc["a"]["b"] for "a.b", or ABSENT."""
    parent, _, key = dotted.partition(".")
    section = doc.get(parent)
    return section.get(key, ABSENT) if isinstance(section, dict) else ABSENT


def _small_batches(attempts) -> list | None:
    """KTO's batch attempts with per_device < 2 (None: not a non-empty list of attempts)."""
    if not isinstance(attempts, list) or not attempts:
        return None
    return [a for a in attempts if not (isinstance(a, dict) and isinstance(a.get("per_device"), int)
                                        and a["per_device"] >= 2)]


def _check_invariants(cfg: Config, stage: str, doc: dict, rel: str) -> dict:
    """What the trainer must have held to: fp16 trains fp32 adapters, one live model, KTO batches of >= 2."""
    fields = INVARIANT_FIELDS + (("batch.attempts",) if stage == "kto" else ())
    got = {f: _field(doc, f) for f in fields}
    problems = [f"{rel} records no {f} (evidence older than the field: re-run the stage)"
                for f, v in got.items() if v is ABSENT]
    dtype, trainable, live = (got[f] for f in INVARIANT_FIELDS)
    if dtype == "fp16" and trainable is not ABSENT and trainable != "float32":
        problems.append(f"precision.trainable_dtype is {trainable!r} under fp16: GradScaler unscales "
                        "float32 gradients only, so the adapters must train in float32")
    if live is not ABSENT and not (isinstance(live, int) and live <= 1):
        problems.append(f"memory.max_live_models is {live!r}: more than one model was alive at once (a leak)")
    if stage == "kto" and got["batch.attempts"] is not ABSENT:
        small = _small_batches(got["batch.attempts"])
        if small is None:
            problems.append(f"batch.attempts is {got['batch.attempts']!r}, expected the list of batch attempts")
        elif small:
            problems.append(f"batch.attempts with per_device < 2: {small[:3]}; KTO's KL term pairs the samples "
                            "of a device batch, with 1 it is the implied reward (trl/trainer/kto_trainer.py:846)")
    ok = f"trainables {trainable} under {dtype}, at most {live} live model(s)"
    ok += ", every KTO batch >= 2" if stage == "kto" else ""
    return _result(f"{stage}.invariants", problems, ok, rel)


def check_training(cfg: Config, stage: str, plan: dict, vs=None) -> list[dict]:
    """The checks of one training stage; `vs` (variants.Variants) shares one base model between the probes."""
    if vs is None:
        from pipeline.variants import Variants
        with Variants(None, plan) as own:
            return check_training(cfg, stage, plan, own)
    rel = evidence_path(cfg, stage)
    doc = ev.read_json(Path(cfg.root) / rel)
    metrics = _check_metrics(cfg, stage, doc, rel)
    ids = ["checkpoint", "loads", "curve", "steps", "base_model", "invariants"]
    ids += ["from_sft"] if stage != "sft" else []
    if not isinstance(doc, dict) or doc.get("status") != "ok" or doc.get("stage") != stage:
        return [metrics] + [_blocked(f"{stage}.{i}", f"{stage}.metrics", f"{stage}.metrics failed", rel) for i in ids]
    checkpoint = _check_checkpoint(cfg, stage, doc, rel)
    loads = (_check_loads(cfg, stage, doc, vs) if checkpoint["passed"] else
             _blocked(f"{stage}.loads", f"{stage}.checkpoint", "the checkpoint check failed", checkpoint["evidence"]))
    out = [metrics, checkpoint, loads, _check_curve(cfg, stage, doc, rel), _check_steps(cfg, stage, doc, rel),
           _check_base(cfg, stage, doc, rel), _check_invariants(cfg, stage, doc, rel)]
    return out + ([_check_from_sft(cfg, stage, doc, rel)] if stage != "sft" else [])


# --- eval, judges, chain ------------------------------------------------------------------------------
def check_eval(cfg: Config) -> dict:
    rel = evidence_path(cfg, "eval")
    root = Path(cfg.root)
    doc = ev.read_json(root / rel)
    if not isinstance(doc, dict):
        return _result("eval.coverage", [f"{rel} is missing: run `python -m pipeline run eval`"], "", rel)
    problems = [f"status is {doc.get('status')!r}: {doc.get('reason')}"] if doc.get("status") != "ok" else []
    problems += [f"does not match its schema: {e}" for e in ev.validate("eval", doc)[:1]]
    sets, variants, results = doc.get("sets") or {}, doc.get("variants") or {}, doc.get("results") or {}
    planned = {}
    for name in cfg.eval.sets:
        info = sets.get(name)
        if not isinstance(info, dict):
            problems.append(f"set {name} was not evaluated")
            continue
        size, full, ids = cfg.eval.sample_sizes.get(name), info.get("full_size"), info.get("question_ids") or []
        want = full if size is None else (min(size, full) if isinstance(full, int) else size)
        if info.get("planned_n") != want or len(ids) != want or len(set(map(str, ids))) != want:
            problems.append(f"set {name}: planned_n {info.get('planned_n')}, {len(ids)} question ids, the plan is {want}")
        planned[name] = (info.get("planned_n"), list(ids))
    for stage in TRAIN:
        entry = variants.get(stage)
        if not isinstance(entry, dict) or entry.get("status") != "scored":
            problems.append(f"variant {stage} was not scored ({(entry or {}).get('reason', 'absent')})")
            continue
        metrics = ev.read_json(root / evidence_path(cfg, stage)) or {}
        if metrics.get("status") != "ok" or not metrics.get("checkpoint_sha256"):
            problems.append(f"variant {stage} is marked scored but the {stage} stage has no ok final checkpoint")
        elif "checkpoint_sha256" in entry and entry["checkpoint_sha256"] != metrics["checkpoint_sha256"]:
            problems.append(f"variant {stage} was scored on a checkpoint that is not the current {stage} final")
    for variant, entry in variants.items():
        if isinstance(entry, dict) and entry.get("status") == "scored":
            for name, (n, ids) in planned.items():
                res = (results.get(variant) or {}).get(name)
                if not isinstance(res, dict) or res.get("n") != n:
                    problems.append(f"variant {variant} on {name}: n {(res or {}).get('n')}, planned {n}")
                elif "question_ids" in res and list(res["question_ids"]) != ids:
                    problems.append(f"variant {variant} on {name} used other question ids than planned")
    sizes = ", ".join(f"{k} {v[0]}" for k, v in planned.items())
    return _result("eval.coverage", problems[:8], f"{', '.join(TRAIN)} scored on the same question ids ({sizes})", rel)


def check_judges(cfg: Config) -> list[dict]:
    rel = evidence_path(cfg, "judge")
    doc = ev.read_json(Path(cfg.root) / rel)
    schema = [f"{rel} does not match its schema: {e}" for e in ev.validate("judge", doc)[:1]] if isinstance(doc, dict) else []
    out = []
    for key, flag, var in JUDGES:
        enabled = getattr(cfg.judge, flag)
        entry = (doc or {}).get(key) or {}
        if not isinstance(doc, dict):
            out.append(_result(f"judge.{key}", [f"{rel} is missing: run `python -m pipeline run judge`"], "", rel))
        elif not enabled:
            problems = list(schema)
            if doc.get("status") not in ("ok", "skipped"):
                problems.append(f"the judge stage is {doc.get('status')!r} ({doc.get('reason')}), so nothing records the {key} judge as disabled")
            elif entry.get("enabled") is True:
                problems.append(f"{rel} says the {key} judge ran enabled but {var}=false now: re-run the judge stage")
            out.append(_result(f"judge.{key}", problems, f"{key} judge disabled ({var}=false), recorded as disabled", rel))
        else:
            planned, judged = entry.get("planned"), entry.get("judged")
            problems = list(schema)
            if doc.get("status") != "ok" or entry.get("enabled") is not True:
                problems.append(f"{var}=true but the {key} judge did not run (status {doc.get('status')!r}: {doc.get('reason')})")
            elif not (isinstance(planned, int) and planned > 0 and isinstance(judged, int) and 0 <= judged <= planned):
                problems.append(f"{key}: planned {planned!r}, judged {judged!r} are not counts with 0 <= judged <= planned > 0")
            else:
                coverage = judged / planned
                if not math.isclose(coverage, float(entry.get("coverage") or 0), abs_tol=1e-6):
                    problems.append(f"{key}: recorded coverage {entry.get('coverage')} but judged/planned = {coverage:.4f}")
                if coverage < cfg.judge.min_coverage:
                    problems.append(f"{key}: coverage {coverage:.1%} ({judged}/{planned}) is below the minimum {cfg.judge.min_coverage:.0%}")
            out.append(_result(f"judge.{key}", problems, f"{key} judge judged {judged}/{planned} (min {cfg.judge.min_coverage:.0%})", rel))
    return out


def check_chain(cfg: Config) -> list[dict]:
    from pipeline.engine import fingerprint, status_of
    from pipeline.stages import REGISTRY
    root = Path(cfg.root)
    markers = sorted(p.relative_to(root).as_posix() for p in (root / "reports/.incomplete").glob("*") if p.is_file())
    out = [_result("chain.no_incomplete", [f"a stage was interrupted and left its marker: {', '.join(markers)}"] if markers else [],
                   "no stage left an incomplete marker", "reports/.incomplete/")]
    found: dict[str, list[str]] = {"stale": [], "tampered": []}
    unfinished = []
    for stage in (s for s in REGISTRY.stages if s.in_all):
        state = status_of(stage, cfg, fingerprint(stage, cfg, REGISTRY)[0])
        found.get(state, []).append(stage.name)
        if not stage.training and state not in ("ok", "skipped", "stale", "tampered"):
            unfinished.append(f"{stage.name} is {state} ({stage.evidence(cfg)})")
    out.append(_result("chain.stages", unfinished, "every other stage of `make gpu-run` finished", "reports/"))
    bad = [f"{', '.join(names)}: {why}" for names, why in (
        (found["stale"], "stale (config, data or upstream evidence changed since they ran)"),
        (found["tampered"], "tampered (their recorded outputs changed on disk)")) if names]
    out.append(_result("chain.fresh", bad, "every stage's evidence matches the current config, inputs, upstream and outputs",
                       "reports/"))
    return out


# --- the gate -----------------------------------------------------------------------------------------
def evaluate(cfg: Config) -> dict:
    """Every check, recomputed from the files; strict_pass is their conjunction."""
    from pipeline.variants import Variants
    plan = probe_plan(Path(cfg.root))
    with Variants(None, plan) as vs:   # every probe on one base model load
        checks = [c for stage in TRAIN for c in check_training(cfg, stage, plan, vs)]
        memory = vs.memory()
    checks += [check_eval(cfg), *check_judges(cfg), *check_chain(cfg)]
    training_failed = any(not c["passed"] for c in checks if c["id"].split(".")[0] in TRAIN)
    for c in checks:
        if not c["passed"]:
            c["todo"] = advice(cfg, c, training_failed)
    failed = [c["id"] for c in checks if not c["passed"]]
    from pipeline.engine import git_commit, now
    return {"strict_pass": not failed, "failed": failed, "tier": cfg.tier, "root": cfg.root, "checked_at": now(),
            "git_commit": git_commit(), "probe_plan": plan, **memory, "checks": checks}


def advice(cfg: Config, check: dict, training_failed: bool = False) -> str:
    """What to do next for a failing check (the Day-1 guide's usual causes first)."""
    stage, kind = check["id"].split(".", 1)
    detail = check["detail"]
    redo = f"re-run it: `python -m pipeline run {stage} --force` (then `make gpu-run` for the stages after it)"
    if "FORCE_SKIP_TRAINING" in detail:
        return "FORCE_SKIP_TRAINING is on: unset it (or set it to false in .env) and run `make gpu-run`"
    if check.get("blocked_by"):
        return f"fix {check['blocked_by']} first"
    if stage != "sft" and "needs sft, which was skipped" in detail:
        return "fix sft.metrics first: this stage skipped only because sft did; `make gpu-run` then trains it"
    if stage in ("eval", "judge") and training_failed:
        return "fix the failing training checks first; `make gpu-run` then re-runs this stage by itself"
    if kind == "metrics" and ("CUDA" in detail or "memory" in detail or "feasible" in detail):
        var = "MIN_CUDA_MEM_GB_14B" if cfg.tier == "14b" else "MIN_CUDA_MEM_GB_7B"
        return (f"training was skipped for lack of CUDA or GPU memory: run on a GPU with at least {var} GB free "
                "(see reports/migration/gpu_check.json), or use MODEL_TIER=demo for a CPU smoke run")
    return {
        "metrics": f"the evidence is missing, not ok, or not this stage's own: read reports/logs/{stage}_full.log and {redo}",
        "checkpoint": f"the final checkpoint is missing or changed since training (never edit it): {redo}",
        "loads": f"the checkpoint does not load or generate: read the error above, check the base model is reachable "
                 f"(MODEL_NAME, HF cache), then {redo}",
        "curve": f"no real loss curve (never edit metrics files): {redo}",
        "steps": f"training stopped before its plan: look for OOM retries or an interruption in reports/logs/{stage}_full.log, then {redo}",
        "base_model": f"the stage trained another base model than the config names: check MODEL_TIER/MODEL_NAME, then {redo}",
        "from_sft": f"the SFT final changed after {stage} trained on it: {redo}",
        "invariants": f"the metrics predate these fields, or the trainer broke an invariant: {redo}; if it "
                      f"breaks again, report it with reports/logs/{stage}_full.log (a pipeline defect)",
        "coverage": "run `python -m pipeline run eval --force` once every training stage is ok",
        "pairwise": "set OPENAI_API_KEY (and OPENAI_BASE_URL) in .env, or set ENABLE_LLM_JUDGE=false; then `python -m pipeline run judge --force`",
        "risk": "set OPENAI_API_KEY (and OPENAI_BASE_URL) in .env, or set ENABLE_LLM_RISK_JUDGE=false; then `python -m pipeline run judge --force`",
        "no_incomplete": "a stage was interrupted: run `make gpu-run` again (it resumes), then `make gpu-complete-check`",
        "fresh": "run `make gpu-run`: it redoes exactly the stages whose config, data or upstream changed",
        "stages": "read reports/logs/<stage>_full.log of each stage named above, fix the cause, then run `make gpu-run` again",
    }.get(kind, redo)


def gate_markdown(gate: dict) -> str:
    checks = gate["checks"]
    roots = [c for c in checks if not c["passed"] and not c.get("blocked_by")]
    blocked = [c for c in checks if not c["passed"] and c.get("blocked_by")]
    lines = [f"# Completion check: strict_pass {str(gate['strict_pass']).lower()}", "",
             f"Tier `{gate['tier']}`, root `{gate['root']}`, checked {gate['checked_at']}, commit `{gate['git_commit']}`.",
             f"{len(checks) - len(gate['failed'])} of {len(checks)} checks pass; the checkpoint probes loaded the "
             f"base {gate['base_loads']}x, at most {gate['max_live_models']} model(s) alive.", ""]
    if roots:
        lines += ["## Failing (fix these first)", ""]
        lines += [f"- **{c['id']}** ({c['evidence']}): {c['detail']}\n  - what to do: {c['todo']}" for c in roots]
        lines.append("")
    if blocked:
        lines += ["## Not checked (blocked by a failure above)", "", ", ".join(f"`{c['id']}`" for c in blocked), ""]
    lines += ["## Passing", ""] + [f"- {c['id']}: {c['detail']}" for c in checks if c["passed"]]
    return "\n".join(lines) + "\n"


# --- thesis readiness ---------------------------------------------------------------------------------
REHEARSAL_BLOCKER = "rehearsal: the weights were a stand-in"


def rehearsal_evidence(cfg: Config) -> list[str]:
    """The evidence files that say the run was a rehearsal (a `rehearsal` entry: gpu_check, training metrics)."""
    files = ["reports/migration/gpu_check.json"] + [evidence_path(cfg, stage) for stage in TRAIN]
    docs = {rel: ev.read_json(Path(cfg.root) / rel) for rel in files}
    return [rel for rel, d in docs.items() if isinstance(d, dict) and d.get("rehearsal") not in (None, False)]


def thesis_readiness(cfg: Config, strict_pass: bool) -> dict:
    root = Path(cfg.root)
    blockers = []
    if not strict_pass:
        blockers.append(f"the strict completion check does not pass (see {GATE.replace('.json', '.md')})")
    if cfg.tier not in GPU_TIERS:
        blockers.append(f"tier {cfg.tier} is a smoke tier: never ready for writing (use MODEL_TIER=7b or 14b on a GPU)")
    rehearsal = rehearsal_evidence(cfg)
    if rehearsal:
        blockers.append(REHEARSAL_BLOCKER)
    sets = (ev.read_json(root / evidence_path(cfg, "eval")) or {}).get("sets") or {}
    partial = [f"{n} ({sets[n].get('planned_n')} of {sets[n].get('full_size')})" if isinstance(sets.get(n), dict)
               else f"{n} (not evaluated)" for n in cfg.eval.sets
               if not isinstance(sets.get(n), dict) or sets[n].get("planned_n") != sets[n].get("full_size")
               or not sets[n].get("full_size")]
    if partial:
        blockers.append(f"the eval is not on the full sets: {', '.join(partial)}; set eval.sample_sizes to null")
    present = {a: (root / a).is_file() for a in ARTIFACTS}
    figures = sorted(p.relative_to(root).as_posix() for p in (root / "reports/figures").glob("*.png"))
    missing = [a for a, ok in present.items() if not ok] + ([] if figures else ["reports/figures/*.png"])
    if missing:
        blockers.append(f"missing thesis artifact(s): {', '.join(missing)} (run `python -m pipeline run reports`)")
    from pipeline.engine import now
    return {"ready_for_writing": not blockers, "blockers": blockers, "tier": cfg.tier, "strict_pass": strict_pass,
            "rehearsal": rehearsal, "eval_full_size": not partial, "artifacts": present, "figures": figures,
            "checked_at": now()}


def readiness_markdown(r: dict) -> str:
    head = "ready for writing" if r["ready_for_writing"] else "NOT ready for writing"
    lines = [f"# Thesis readiness: {head}", "", f"Tier `{r['tier']}`, checked {r['checked_at']}.", ""]
    lines += (["## Blockers", ""] + [f"- {b}" for b in r["blockers"]]) if r["blockers"] else ["No blockers."]
    lines += ["", "## Artifacts", ""] + [f"- [{'x' if ok else ' '}] {a}" for a, ok in r["artifacts"].items()]
    lines.append(f"- [{'x' if r['figures'] else ' '}] figures: {', '.join(r['figures']) or 'none'}")
    return "\n".join(lines) + "\n"


def main(cfg: Config, console) -> int:
    """`python -m pipeline check`: run every check, write both verdicts, exit 0 iff strict_pass."""
    from rich.markup import escape
    from rich.table import Table
    root = Path(cfg.root)
    gate = evaluate(cfg)
    readiness = thesis_readiness(cfg, gate["strict_pass"])
    ev.atomic_write_json(root / GATE, gate)
    ev.atomic_write_text(root / GATE.replace(".json", ".md"), gate_markdown(gate))
    ev.atomic_write_json(root / READINESS, readiness)
    ev.atomic_write_text(root / READINESS.replace(".json", ".md"), readiness_markdown(readiness))
    table = Table(title=f"completion check (tier {cfg.tier})", show_lines=False)
    for col in ("check", "", "detail"):
        table.add_column(col, overflow="fold")
    for c in sorted(gate["checks"], key=lambda c: c["passed"]):
        if not c.get("blocked_by"):
            table.add_row(c["id"], "[green]pass[/]" if c["passed"] else "[red]FAIL[/]", escape(c["detail"]))
    console.print(table)
    blocked = [c["id"] for c in gate["checks"] if c.get("blocked_by")]
    if blocked:
        console.print(f"[red]not checked[/] (blocked by a failure above): {', '.join(blocked)}")
    colour = "green" if gate["strict_pass"] else "red"
    console.print(f"[{colour}]strict_pass: {str(gate['strict_pass']).lower()}[/] ({len(gate['failed'])} failing)  -> {GATE}")
    console.print(f"ready_for_writing: {str(readiness['ready_for_writing']).lower()}"
                  + "".join(f"\n  - {escape(b)}" for b in readiness["blockers"]) + f"\n  -> {READINESS}")
    return 0 if gate["strict_pass"] else 1


# --- day1_run.sh helpers --------------------------------------------------------------------------------
def key_report(cfg: Config, has_key: bool) -> list[str]:
    """Warnings for judge flags that are on without an API key (the key itself is never shown)."""
    flags = [("ENABLE_LLM_JUDGE", cfg.judge.enabled), ("ENABLE_LLM_RISK_JUDGE", cfg.judge.risk_enabled),
             ("ENABLE_V2_LLM_FALLBACK", cfg.eval.llm_fallback)]
    if has_key:
        on = [name for name, value in flags if value]
        return [f"OPENAI_API_KEY is configured (endpoint {cfg.judge.base_url or 'the OpenAI default'}); enabled: {', '.join(on) or 'no LLM judge'}"]
    lines = ["OPENAI_API_KEY is not set (neither in the environment nor in .env)."]
    lines += [f"warning: {name}=true will fail without a key: set OPENAI_API_KEY in .env or {name}=false"
              for name, value in flags if value]
    return lines


def day1_summary(root: Path, steps: list[dict], dry_run: bool, cfg: Config | None, config_error: str | None) -> dict:
    """The Day-1 summary from the step records; the gate's verdict is the gate step's exit status."""
    by_name = {s["name"]: s for s in steps}
    gate_step = by_name.get("gpu-complete-check") or {}
    ran_gate = gate_step.get("status") in ("ok", "failed")
    trained = (by_name.get("gpu-run") or {}).get("status") in ("ok", "failed")
    out = {"dry_run": dry_run, "tier": cfg.tier if cfg else None, "root": str(root), "config_error": config_error,
           "steps": steps, "trained": trained, "gate": {"ran": ran_gate}, "first_fixes": []}
    for s in [s for s in steps if s["status"] == "failed" and s["name"] != "gpu-complete-check"][:3]:
        out["first_fixes"].append(f"step {s['name']} failed (exit {s['rc']}): {_last_line(root / s['log'])} (log: {s['log']})")
    if ran_gate:
        strict = gate_step["status"] == "ok"
        before = root / ((by_name.get("gpu-run") or {}).get("log") or "-")   # finished before the gate started
        fresh = (root / GATE).is_file() and (not before.is_file() or (root / GATE).stat().st_mtime >= before.stat().st_mtime)
        gate_doc = ev.read_json(root / GATE) if fresh else {}
        if not fresh:
            out["first_fixes"].append(f"the gate wrote no new {GATE} (did it crash?): read {gate_step['log']}")
        roots = [c for c in gate_doc.get("checks", []) if isinstance(c, dict) and c.get("todo") and not c.get("blocked_by")]
        out["gate"].update(strict_pass=strict, failed=gate_doc.get("failed", []), report=GATE.replace(".json", ".md"))
        out["first_fixes"] += [f"{c['id']}: {c['detail']} -> {c['todo']}" for c in roots[:5]]
        if cfg is not None:
            r = thesis_readiness(cfg, strict)
            out["thesis_readiness"] = {"ready_for_writing": r["ready_for_writing"], "blockers": r["blockers"]}
    if dry_run:
        dry = ev.read_json(root / "reports/migration/dry_run.json") or {}
        out["dry_run_result"] = {"status": dry.get("status", "missing"), "reason": dry.get("reason")}
        if dry.get("status") not in ("dry_run", "ok") and dry.get("reason"):
            out["first_fixes"].append(f"the dry run ({dry.get('status', 'missing')}): {dry['reason']} (reports/migration/dry_run.json)")
        plan = (ev.read_json(root / "reports/migration/gpu_check.json") or {}).get("plan") or {}
        if plan and not plan.get("feasible"):
            out["first_fixes"].append(f"a real run would skip training here: {plan.get('feasible_reason')} "
                                      "(reports/migration/gpu_check.json)")
        out["verdict"] = ("DRY RUN: nothing was trained; the dry run " +
                          ("passed" if (by_name.get("dry-run") or {}).get("status") == "ok" else "did not pass"))
    elif ran_gate:
        out["verdict"] = f"strict_pass: {str(out['gate']['strict_pass']).lower()}" + ("" if trained else " (nothing was trained)")
    else:
        out["verdict"] = "the gate did not run: the run stopped early" + ("" if trained else "; nothing was trained")
    if config_error:
        out["first_fixes"].insert(0, f"config error: {config_error}")
    return out


def _last_line(log: Path) -> str:
    """The last non-empty line of a step log, without terminal colour codes: usually the reason."""
    import re
    try:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    engine_verdicts = [x for x in lines if x.startswith(("failed ", "blocked ", "✗ "))]   # pipeline.engine's lines
    if engine_verdicts:
        return "; ".join(engine_verdicts[-3:])
    noise = ("make: ***", "make[", *"│┃└┘┌┐┏┓┗┛━─╇┡╭╰")   # make's own error line, rich table borders
    return next((x for x in reversed(lines) if x and not x.startswith(noise)), "empty log")


def summary_markdown(s: dict) -> str:
    lines = ["# Day-1 run summary", "", f"**{s['verdict']}**", "", f"Tier `{s['tier'] or 'unknown (config error)'}`, output root `{s['root']}`.", "",
             "| step | status | seconds | log | note |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {x['status']} | {x['seconds']} | {x['log']} | {x['note']} |" for x in s["steps"]]
    if s["first_fixes"]:
        lines += ["", "## First things to fix", ""] + [f"{i}. {f}" for i, f in enumerate(s["first_fixes"], 1)]
    if "thesis_readiness" in s:
        r = s["thesis_readiness"]
        lines += ["", f"## Thesis readiness: ready_for_writing {str(r['ready_for_writing']).lower()}", ""]
        lines += [f"- {b}" for b in r["blockers"]]
    return "\n".join(lines) + "\n"


def read_steps(path: Path) -> list[dict]:
    """Step records written by day1_run.sh: name, status, rc, seconds, log file name, note (tab-separated)."""
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            name, status, rc, seconds, log, note = (line.split("\t") + [""] * 6)[:6]
            steps.append({"name": name, "status": status, "rc": int(rc) if rc.strip().lstrip("-").isdigit() else None,
                          "seconds": int(seconds or 0), "log": f"reports/logs/{log}" if log else "", "note": note})
    return steps


def cli(argv: list[str] | None = None) -> int:
    from pipeline.settings import REPO, ConfigError, env_flag, environment, load_config, secret
    parser = argparse.ArgumentParser(prog="python -m pipeline.checker")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="the strict gate (same as python -m pipeline check)")
    sub.add_parser("keys", help="exit 0 with a key, 3 without one, 2 on a config error")
    sub.add_parser("root", help="print the output root")
    p_flag = sub.add_parser("flag", help="print true/false for a boolean environment variable")
    p_flag.add_argument("name")
    p_sum = sub.add_parser("summary", help="write reports/migration/day1_run_summary.md + .json")
    p_sum.add_argument("steps", type=Path)
    p_sum.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "flag":
            print(str(env_flag(args.name)).lower())
            return 0
        cfg, error = load_config(), None
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        if args.cmd not in ("summary", "root"):
            return 2
        cfg, error = None, str(exc)
    root = Path(cfg.root) if cfg else Path(environment().get("PIPELINE_ROOT") or REPO).expanduser().resolve()
    if args.cmd == "root":
        print(root)
        return 0
    if args.cmd == "keys":
        has_key = secret("OPENAI_API_KEY") is not None
        print("\n".join(key_report(cfg, has_key)))
        return 0 if has_key else 3
    if args.cmd == "summary":
        s = day1_summary(root, read_steps(args.steps), args.dry_run, cfg, error)
        ev.atomic_write_json(root / SUMMARY, s)
        ev.atomic_write_text(root / SUMMARY.replace(".json", ".md"), summary_markdown(s))
        print(f"{s['verdict']}\nsummary: {root / SUMMARY.replace('.json', '.md')}")
        return 0
    from rich.console import Console
    return main(cfg, Console(highlight=False))


if __name__ == "__main__":
    sys.exit(cli())

"""The preflight's arithmetic, pure (no model, no files): a stage's predicted wall time, eval's and the judges',
cost, the budget decision before the run and between stages (re-projection), the batch a stage starts with, and
the timeline the dry run and the Day-1 summary print. pipeline/stages/preflight.py measures and re-exports these.

Tests: tests/unit/test_preflight_math.py
"""
from __future__ import annotations

import math

EVAL_FORWARD_SHARE = 1 / 3   # an eval micro-batch is a forward only: ~1/3 of a training micro-step (fwd + bwd)
SAVE_FACTOR = 2.0            # a checkpoint adds optimizer + scheduler state to the adapter the preflight saves
BASIS = (f"planned optimizer steps x the s/step measured on the stage's longest rows (in tokens) at its longest "
         f"max_length, scaled by the stage's mean row tokens over the trial's (a step costs what its tokens do; "
         f"curriculum parts at shorter lengths run faster: an upper bound there), plus the measured base load + "
         f"trainer build per (sub-)stage, {SAVE_FACTOR:g} x the measured adapter save per checkpoint, and SFT's "
         f"eval-loss passes at {EVAL_FORWARD_SHARE:.2f} of a training micro-step per eval micro-batch; eval: per set "
         f"one measured generation batch, the log-likelihood protocol on a few questions and (eval.free_answer) one "
         f"free-answer batch, extrapolated to questions x variants, plus the measured adapter switch and the base "
         f"load; judges: planned requests / concurrency x one measured request's latency, plus their answers' "
         f"generation")


def predict_stage(planned_steps: int, s_per_step: float, load_s: float, loads: int, save_s: float, saves: int,
                  eval_passes: int = 0, eval_batches: int = 0, grad_acc: int = 1) -> dict:
    """A training stage's wall time: its steps at the measured rate plus the stated allowance."""
    allowance = {"model_load_s": load_s * loads, "saves_s": SAVE_FACTOR * save_s * saves,
                 "eval_loss_s": eval_passes * eval_batches * EVAL_FORWARD_SHARE * s_per_step / max(1, grad_acc)}
    train_s = planned_steps * s_per_step
    return {"train_s": round(train_s, 2), "allowance": {k: round(v, 2) for k, v in allowance.items()},
            "fixed_s": round(allowance["model_load_s"] + allowance["saves_s"], 2),
            "predicted_s": round(train_s + sum(allowance.values()), 2)}


def predict_generation(load_s: float, per_set: dict[str, dict], variants: int, free_variants: int = 0,
                       switch_s: float = 0.0) -> dict:
    """Eval's wall time: the base load, then for each variant every set's questions under each protocol at the rate
    measured for that set ({set: {"questions", "batch", "batch_s"[, "loglik_rows", "loglik_s"][, "free_batch_s"]}}):
    generation in batches of `batch` (the last one partial), the log-likelihood protocol at loglik_s per
    loglik_rows questions, and for `free_variants` (the base) the free-answer protocol at free_batch_s per batch;
    plus `switch_s` per trained variant (variants - 1: its final's hash check and its adapter switched on)."""
    per_variant = sum(math.ceil(s["questions"] / s["batch"]) * s["batch_s"]
                      + (s["questions"] / s["loglik_rows"] * s["loglik_s"] if s.get("loglik_rows") else 0.0)
                      for s in per_set.values())
    free = sum(math.ceil(s["questions"] / s["batch"]) * s["free_batch_s"] for s in per_set.values()
               if s.get("free_batch_s") is not None) * free_variants
    return {"load_s": round(load_s, 2), "variants": variants, "per_variant_s": round(per_variant, 2),
            "switch_s": round(switch_s, 3), "free_answer_s": round(free, 2),
            "predicted_s": round(load_s + variants * per_variant + (variants - 1) * switch_s + free, 2)}


def predict_judge(requests: dict[str, int], concurrency: int, latency_s: float, answers_s: float = 0.0) -> dict:
    """The judges' wall time: each judge's planned requests ({kind: n}, one judge after the other) in waves of
    `concurrency` at the measured latency, plus the variants' answers to the judge questions."""
    waves = sum(math.ceil(n / max(1, concurrency)) for n in requests.values())
    return {"requests": sum(requests.values()), "per_kind": dict(requests), "concurrency": concurrency,
            "waves": waves, "latency_s": round(latency_s, 3), "answers_s": round(answers_s, 2),
            "predicted_s": round(waves * latency_s + answers_s, 2)}


def cost(seconds: float, price_per_hour: float | None) -> float | None:
    return None if price_per_hour is None else round(seconds / 3600 * price_per_hour, 4)


def money(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 0.01 else f"{x:.2g}"


def budget_decision(total_s: float, fixed_s: float, price_per_hour: float | None, budget: float | None,
                    planned_steps: dict[str, int]) -> tuple[bool, str | None]:
    """(fits, one-line reason when it does not): over budget by how much, and the step counts that would fit."""
    if budget is None:
        return True, None
    predicted = cost(total_s, price_per_hour)
    if predicted <= budget:
        return True, None
    head = (f"predicted cost {money(predicted)} exceeds BUDGET={budget:g} by {money(predicted - budget)} "
            f"({total_s / 3600:.2f} h at GPU_PRICE_PER_HOUR={price_per_hour:g})")
    affordable_s = budget / price_per_hour * 3600 - fixed_s
    scale = affordable_s / (total_s - fixed_s) if total_s > fixed_s else 0.0
    steps = {m: math.floor(n * scale) for m, n in planned_steps.items()}
    if scale <= 0 or min(steps.values()) < 1:
        return False, (f"{head}; even the model loads and saves alone cost {money(cost(fixed_s, price_per_hour))}: "
                       f"raise BUDGET to at least {money(predicted)}, or use a cheaper GPU")
    fit = " ".join(f"{m}.max_steps={n}" for m, n in steps.items())
    return False, (f"{head}; it would fit with the steps scaled to x{scale:.2f} ({fit}), or with QLORA=true "
                   f"if that runs faster here, a smaller eval sample (eval.sample_sizes), judges off "
                   f"(ENABLE_LLM_JUDGE=false ENABLE_LLM_RISK_JUDGE=false), or with BUDGET >= {money(predicted)}")


def reproject(spent_s: float, predicted: dict[str, float], todo: list[str], price_per_hour: float | None,
              budget: float | None) -> dict:
    """Between stages: the wall time measured so far plus the predictions of the stages still to run. The next
    stage (todo[0]) is stopped when the spend after it would cross the budget; a later stage that would cross it is
    decided when its turn comes, with the time measured by then. {"stop", "projection_s", "reason"}."""
    if budget is None or not todo:
        return {"stop": False, "projection_s": None, "reason": None}
    projection = spent_s + sum(predicted.get(s, 0.0) for s in todo)
    after_next = spent_s + predicted.get(todo[0], 0.0)
    stop = cost(after_next, price_per_hour) > budget
    reason = None
    if stop:
        spent = money(cost(spent_s, price_per_hour))
        reason = (f"BUDGET={budget:g} would be crossed by {todo[0]}: spent so far {spent} ({spent_s:.0f} s measured), {todo[0]} is predicted at {predicted.get(todo[0], 0.0):.0f} s "
                  f"({money(cost(after_next, price_per_hour))} after it), projection of the whole run "
                  f"{money(cost(projection, price_per_hour))} ({projection:.0f} s); every finished stage is kept: "
                  f"re-run with a larger BUDGET to continue from {todo[0]}")
    return {"stop": stop, "projection_s": round(projection, 2), "reason": reason}


def start_batch(doc: dict | None, kind: str, planned: tuple[int, int]) -> tuple[int, int] | None:
    """The (batch, accumulation) an ok preflight found for `kind` when it is smaller than the planned one (it ran
    out of memory there), else None."""
    rec = ((doc or {}).get("stages") or {}).get(kind) if (doc or {}).get("status") == "ok" else None
    if not isinstance(rec, dict) or not isinstance(rec.get("batch"), int) or not isinstance(rec.get("grad_acc"), int):
        return None
    return (rec["batch"], rec["grad_acc"]) if rec["batch"] < planned[0] else None


def first_attempt(doc: dict | None, kind: str, planned: tuple[int, int, str | None]) -> tuple[int, int, str]:
    """A training stage's first (batch, accumulation, reason): the planned one (ranks.first_batch), or the smaller
    one the fresh preflight `doc` found, with the reason "preflight: ..." (its batch attempts record it)."""
    smaller = start_batch(doc, kind, planned[:2])
    if smaller:
        return (*smaller, f"preflight: batch {planned[0]} x accumulation {planned[1]} ran out of memory in its "
                          f"trial; starting at {smaller[0]} x {smaller[1]} (reports/migration/preflight.json)")
    return planned[0], planned[1], planned[2] or "as configured"


def predictions(doc: dict | None) -> dict[str, float]:
    """{stage: predicted seconds} of an ok preflight (or one being written): its training stages, eval and judge."""
    if not doc or doc.get("status", "ok") != "ok":
        return {}
    out = {k: float(r["predicted_s"]) for k, r in (doc.get("stages") or {}).items()}
    for part in ("eval", "judge"):
        if isinstance((doc.get(part) or {}).get("predicted_s"), (int, float)):
            out[part] = float(doc[part]["predicted_s"])
    return out


def timeline(doc: dict) -> list[str]:
    """The predicted timeline, one line per stage, starting after the preflight, and the total."""
    lines, at = [], 0.0
    for name, secs in predictions(doc).items():
        at += secs
        lines.append(f"{name:<8} {secs:>9.1f} s   ends at +{at / 60:.1f} min")
    total = f"total    {doc.get('predicted_total_s', at):>9.1f} s"
    if doc.get("predicted_cost") is not None:
        total += f"   cost {money(doc['predicted_cost'])} at {doc['price_per_hour']:g}/h"
    return lines + [total]


def versus(doc: dict | None, actual: dict[str, float | None]) -> list[dict]:
    """Predicted vs actual seconds per predicted stage, and in total over the stages that have both."""
    rows = []
    for name, pred in predictions(doc).items():
        act = actual.get(name)
        rows.append({"stage": name, "predicted_s": round(pred, 1), "actual_s": None if act is None else round(act, 1),
                     "ratio": round(act / pred, 2) if act is not None and pred > 0 else None})
    both = [r for r in rows if r["actual_s"] is not None]
    if both:
        p, a = sum(r["predicted_s"] for r in both), sum(r["actual_s"] for r in both)
        rows.append({"stage": "total", "predicted_s": round(p, 1), "actual_s": round(a, 1),
                     "ratio": round(a / p, 2) if p > 0 else None})
    return rows

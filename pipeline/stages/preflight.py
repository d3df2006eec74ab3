"""Preflight: a few measured optimizer steps of every training stage on the real model, before anything trains.

Run: python -m pipeline run preflight                    (make preflight; `run all` runs it before sft)
     BUDGET=20 GPU_PRICE_PER_HOUR=2.5 python -m pipeline run all    stops before SFT when the prediction costs more
Writes reports/migration/preflight.json: per training stage (the registry's methods) the batch that fit and every
attempt, peak memory, seconds per optimizer step, tokens/s (no padding) and the predicted wall time; the total, its
cost and the budget decision. Each trainer is built by training.trainer_for, the function its stage uses, on the
stage's longest rows at its longest max_length with the planned batch and accumulation; `preflight.steps` timed
steps after one warm-up. The methods trained from SFT start from the adapter the SFT trial saved.
"""
from __future__ import annotations

import math
import shutil
import threading
import time

from pipeline import data as D
from pipeline import models, ranks
from pipeline import training as T
from pipeline.core import Stage
from pipeline.sections import GPU_TIERS

STAGE = Stage("preflight", "reports/migration/preflight.json", needs=("gpu_check",), stops_run=True,
              requested=lambda cfg: not_requested(cfg),
              inputs=D.files("sft_path", "preference_path", "kto_path"), content=models.base_content,
              reads=(*T.RUN_KEYS, *T.SFT_DATA, *T.PREFERENCE_DATA, "data.kto_path", "lora", "sft", "@aligned",
                     "preflight.steps", "preflight.enabled"),
              # the money keys decide pass/fail, not the measurement: a failed preflight runs again, so a raised
              # BUDGET re-decides, and no budget change re-measures (a budget lowered after an ok preflight is for
              # the between-stage re-projection, issue 10's next slice)
              untracked=(*T.UNTRACKED, "preflight.budget", "preflight.price_per_hour"))

GIB = 1024 ** 3
EVAL_FORWARD_SHARE = 1 / 3   # an eval micro-batch is a forward only: ~1/3 of a training micro-step (fwd + bwd)
SAVE_FACTOR = 2.0            # a checkpoint adds optimizer + scheduler state to the adapter the preflight saves
BASIS = (f"planned optimizer steps x measured s/step at the longest max_length (curriculum parts at shorter "
         f"lengths run faster: an upper bound), plus the measured model load + data preparation per (sub-)stage, "
         f"{SAVE_FACTOR:g} x the measured adapter save per checkpoint, and SFT's eval-loss passes at "
         f"{EVAL_FORWARD_SHARE:.2f} of a training micro-step per eval micro-batch; eval and judges not included")


# --- the arithmetic (pure: tests/unit/test_preflight_math.py) -------------------------------------------------
def predict_stage(planned_steps: int, s_per_step: float, load_s: float, loads: int, save_s: float, saves: int,
                  eval_passes: int = 0, eval_batches: int = 0, grad_acc: int = 1) -> dict:
    """A training stage's wall time: its steps at the measured rate plus the stated allowance."""
    allowance = {"model_load_s": load_s * loads, "saves_s": SAVE_FACTOR * save_s * saves,
                 "eval_loss_s": eval_passes * eval_batches * EVAL_FORWARD_SHARE * s_per_step / max(1, grad_acc)}
    train_s = planned_steps * s_per_step
    return {"train_s": round(train_s, 2), "allowance": {k: round(v, 2) for k, v in allowance.items()},
            "fixed_s": round(allowance["model_load_s"] + allowance["saves_s"], 2),
            "predicted_s": round(train_s + sum(allowance.values()), 2)}


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
                   f"if that runs faster here, or with BUDGET >= {money(predicted)}")


# --- measuring one trainer ------------------------------------------------------------------------------
def longest(rows: list, n: int, size) -> list:
    """The n longest rows (by `size`), repeated when there are fewer."""
    ranked = sorted(rows, key=size, reverse=True)
    return [ranked[i % len(ranked)] for i in range(n)]


class RssPeak:
    """Peak resident memory of this process while the block runs (CPU: sampled every 10 ms)."""

    def __enter__(self):
        import psutil
        self.proc, self.start = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self.done = self.start, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def trial(ctx, kind: str, base: str, tok, data: dict, length: int, batch: int, grad_acc: int, out,
          adapter: str | None) -> dict:
    """Build the stage's trainer (training.trainer_for) and run 1 + preflight.steps optimizer steps."""
    import torch
    from pipeline.selftest_kit import meter, speed
    cfg, plan = ctx.cfg, ctx.plan
    cuda, steps = plan["device"] == "cuda", cfg.preflight.steps
    args = T.base_args(cfg, kind, plan, out, batch, grad_acc)
    args.update(max_steps=steps + 1, save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True)
    rec, trainer = {"batch": batch, "grad_acc": grad_acc, "oom": False}, None
    models.release()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    try:
        with RssPeak() as rss:
            trainer = T.trainer_for(cfg, kind, plan, base, tok, data, length, args, adapter=adapter)
            models.fix_trainable_dtype(trainer.model, plan)
            rec["load_s"] = round(time.monotonic() - t0, 3)
            trainer.add_callback(T.make_callbacks(cfg, kind, steps + 2)[0])   # the OOM hook, as in fit(); no save
            m = meter(trainer.model, cuda)
            trainer.add_callback(m)
            trainer.train()
            m.counter.handle.remove()
        rec.update(speed=speed(m.marks), global_step=trainer.state.global_step)
        timed = rec["speed"]["per_step"][1:] or rec["speed"]["per_step"]
        rec["s_per_step"] = round(sum(s["seconds"] for s in timed) / len(timed), 4)
        rec["tokens_per_s"] = rec["speed"]["tokens_per_s"]
        rec["peak_mem_gb"] = round((torch.cuda.max_memory_reserved() if cuda else rss.peak - rss.start) / GIB, 3)
        t1 = time.monotonic()
        trainer.save_model(str(out / "adapter"))   # the methods trained from SFT start from SFT's
        rec["save_s"] = round(time.monotonic() - t1, 3)
    except Exception as exc:  # noqa: BLE001 - an allocation failure is this batch's result; the rest re-raise
        if not T.is_oom(exc):
            raise
        rec.update(oom=True, error=(str(exc).splitlines() or [type(exc).__name__])[0][:200])
    trainer = None
    models.release()
    return rec


def measure(ctx, kind: str, base: str, tok, data: dict, length: int, adapter: str | None) -> dict:
    """Trials from the planned batch down (half the batch, twice the accumulation) until one fits."""
    tc = getattr(ctx.cfg, kind)
    batch, grad_acc, raised = T.first_batch(kind, tc.batch_size, tc.grad_acc)
    out, attempts = ctx.root / "checkpoints" / ".preflight" / kind, []
    while True:
        rec = trial(ctx, kind, base, tok, data, length, batch, grad_acc, out, adapter)
        attempts.append({k: rec.get(k) for k in ("batch", "grad_acc", "oom", "error") if k in rec})
        if not rec["oom"]:
            break
        batch, grad_acc = ranks.halved_after_oom(batch, grad_acc, len(attempts) - 1, f"in the {kind} preflight",
                                                 T.method(kind).min_batch, tc.max_oom_retries)
        ctx.log(f"[yellow]{kind}: out of memory; trying batch {batch} x accumulation {grad_acc}")
    return {**rec, "attempts": attempts, "batch_note": raised, "max_length": length,
            "adapter_dir": str(out / "adapter")}


# --- the stage ----------------------------------------------------------------------------------------------
def stage_data(ctx, kind: str, tok, n: int) -> tuple[dict, int, dict]:
    """A stage's longest n rows as its trainer's datasets, its longest max_length, and SFT's eval-loss plan."""
    from datasets import Dataset
    cfg, tc = ctx.cfg, getattr(ctx.cfg, kind)
    length = max([tc.max_length] + [c["max_length"] for c in tc.curriculum])
    if T.method(kind).start == "base":
        split = T.sft_splits(cfg)
        rows = longest(split["train"], n, lambda r: sum(len(m["content"]) for m in r["messages"]))
        held = [{"messages": r["messages"]} for r in split["eval"]]
        data = {"train": Dataset.from_list([{"messages": r["messages"]} for r in rows]),
                "eval": Dataset.from_list(held)}
        return data, length, {"passes": tc.max_steps // tc.eval_steps, "rows": len(held)}
    paired = ctx.registry[kind].trainer(cfg)[2]
    rows = T.preference_dataset(cfg, kind, tok, paired)[0]
    size = lambda r: sum(len(m["content"]) for key in ("prompt", "chosen", "rejected", "completion")   # noqa: E731
                         for m in r.get(key, []))
    return {"train": Dataset.from_list(longest(rows, n, size))}, length, {"passes": 0, "rows": 0}


def wanted(cfg) -> bool:
    """preflight.enabled, or when unset: on a GPU tier (paid hours; a rehearsal too), or when money is set.
    On the CPU tiers a measured step costs about what their few training steps do, so it runs when asked."""
    pf = cfg.preflight
    if pf.enabled is not None:
        return pf.enabled
    return cfg.tier in GPU_TIERS or pf.budget is not None or pf.price_per_hour is not None


def not_requested(cfg) -> str | None:
    """Stage.requested: why the preflight is not asked for (the engine records the skip), or None."""
    return None if wanted(cfg) else (
        f"not asked for on the {cfg.tier} tier (it runs by itself on 7b/14b, or with BUDGET or GPU_PRICE_PER_HOUR "
        "set): `make preflight` or preflight.enabled=true measures it")


def run(ctx) -> dict:
    T.gate(ctx)   # a GPU tier this machine cannot train: skipped with the plan's reason, nothing downloaded
    cfg, plan, pf = ctx.cfg, ctx.plan, ctx.cfg.preflight
    budget, price = pf.budget, pf.price_per_hour
    hooks = {"inject_oom_at_step": cfg.runtime.inject_oom_at_step, "inject_oom_rank": cfg.runtime.inject_oom_rank}
    base = models.base_for(cfg)
    tok, adapter, stages = T.sft_tokenizer(base)[0], None, {}
    models.live_high_water(reset=True)
    try:
        for kind in ctx.registry.methods:   # sft first: the others start from the adapter its trial saved
            tc = getattr(cfg, kind)
            n = tc.batch_size * tc.grad_acc * (pf.steps + 1)
            if adapter is not None:
                tok = models.load_tokenizer(adapter)   # as the stages load the SFT final's
            data, length, evals = stage_data(ctx, kind, tok, n)
            rec = measure(ctx, kind, base, tok, data, length, adapter)
            subs = len(tc.curriculum) or 1
            rec.update(planned_steps=tc.max_steps, **predict_stage(
                tc.max_steps, rec["s_per_step"], rec["load_s"], subs, rec["save_s"],
                math.ceil(tc.max_steps / tc.save_steps) + subs, evals["passes"],
                math.ceil(evals["rows"] / rec["batch"]), rec["grad_acc"]))
            adapter = adapter or rec.pop("adapter_dir")
            rec.pop("adapter_dir", None)
            stages[kind] = rec
            ctx.log(f"{kind}: batch {rec['batch']} x {rec['grad_acc']}, {rec['s_per_step']} s/step, "
                    f"{rec['tokens_per_s']} tokens/s, peak {rec['peak_mem_gb']} GiB, predicted {rec['predicted_s']} s")
    finally:
        stages_live = models.live_high_water()
        models.release()
        shutil.rmtree(ctx.root / "checkpoints" / ".preflight", ignore_errors=True)
    total = round(sum(s["predicted_s"] for s in stages.values()), 2)
    fixed = sum(s["fixed_s"] for s in stages.values())
    fits, reason = budget_decision(total, fixed, price, budget, {k: s["planned_steps"] for k, s in stages.items()})
    doc = {"device": plan["device"], "steps": pf.steps, "warmup_steps": 1, "stages": stages,
           "memory_measure": "torch.cuda.max_memory_reserved" if plan["device"] == "cuda" else "peak RSS growth",
           "eval": {"predicted_s": None, "basis": "not predicted yet (issue 10, a later slice)"},
           "judge": {"predicted_s": None, "basis": "not predicted yet (issue 10, a later slice)"},
           "predicted_total_s": total, "predicted_cost": cost(total, price), "budget": budget,
           "price_per_hour": price, "fits_budget": fits, "basis": BASIS, "max_live_models": stages_live,
           "nproc": cfg.runtime.nproc, "rehearsal_fraction": cfg.runtime.rehearsal_fraction, "test_hooks": hooks}
    if not fits:
        return {**doc, "status": "failed", "reason": reason, "reason_code": "over_budget"}
    return doc

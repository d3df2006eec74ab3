"""Preflight: a few measured optimizer steps of every training stage on the real model, before anything trains.

Run: python -m pipeline run preflight                    (make preflight; `run all` runs it before sft)
     BUDGET=20 GPU_PRICE_PER_HOUR=2.5 python -m pipeline run all    stops before SFT when the prediction costs more
Writes reports/migration/preflight.json: per training stage (the registry's methods) the batch that fit and every
attempt, peak memory, seconds per optimizer step, tokens/s (no padding) and the predicted wall time; eval's and the
judges' predictions (pipeline/preflight_eval.py); the total, its cost and the budget decision. The base is loaded
once: each trainer is built by training.trainer_for, the function its stage uses, on that base (given back without
adapters after each trial), on the stage's longest rows (in tokens: pick_rows) at its longest max_length with the
planned batch and accumulation; `preflight.steps` timed steps after a warm-up step (warmup_steps). The methods
trained from SFT start from the adapter the SFT trial saved. A stage then starts at the batch found here
(training.start_batch), and guard() re-projects the budget before each later stage (the engine asks it). The
arithmetic: pipeline/preflight_kit.py.
"""
from __future__ import annotations

import math
import shutil
import threading
import time

from pathlib import Path

from pipeline import data as D
from pipeline import evalsets, models, ranks
from pipeline import evidence as ev
from pipeline import preflight_kit as K
from pipeline import training as T
from pipeline.core import Stage
from pipeline.preflight_eval import eval_prediction, judge_prediction
from pipeline.sections import GPU_TIERS
# the arithmetic (pure) lives in pipeline/preflight_kit.py; re-exported as the stage's own
from pipeline.preflight_kit import (BASIS, EVAL_FORWARD_SHARE, SAVE_FACTOR, budget_decision, cost,  # noqa: F401
                                    money, predict_stage)

STAGE = Stage("preflight", "reports/migration/preflight.json", needs=("gpu_check",), stops_run=True,
              requested=lambda cfg: not_requested(cfg),
              inputs=lambda cfg: D.files("sft_path", "preference_path", "kto_path")(cfg) + evalsets.files(cfg),
              content=models.base_content,
              reads=(*T.RUN_KEYS, *T.SFT_DATA, *T.PREFERENCE_DATA, "data.kto_path", "lora", "sft", "@aligned",
                     *evalsets.reads(), "eval", "judge", "preflight.steps", "preflight.enabled"),
              # the money keys decide pass/fail, not the measurement: a failed preflight runs again, so a raised
              # BUDGET re-decides, and no budget change re-measures (a budget lowered after an ok preflight is
              # decided between stages: guard() below, which the engine asks before each later stage)
              untracked=(*T.UNTRACKED, "preflight.budget", "preflight.price_per_hour"))

GIB = 1024 ** 3


def warmup_steps(plan: dict, first: bool) -> int:
    """Untimed steps before the timed ones. One on CUDA (kernel selection, allocator growth and lazy cuBLAS init make
    a first step slow). On a CPU only for the process's first trial (autograd's first backward; demo, s/step first /
    second: sft 2.15/1.13); later trials' first steps cost what their next ones do (simpo 4.14/3.95, kto 4.68/4.55,
    orpo 3.81/3.77), so they run `preflight.steps` steps only."""
    return 1 if plan["device"] == "cuda" or first else 0


# --- measuring one trainer ------------------------------------------------------------------------------
def longest(rows: list, n: int, size) -> list:
    """The n longest rows (by `size`), repeated when there are fewer."""
    ranked = sorted(rows, key=size, reverse=True)
    return [ranked[i % len(ranked)] for i in range(n)]


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


class RssPeak:
    """Peak resident memory of this process while the block runs (CPU: sampled every 10 ms), from `start` (the RSS
    before the base was loaded: a stage loads it too)."""

    def __init__(self, start: int):
        self.start = self.peak = start

    def __enter__(self):
        import psutil
        self.proc, self.done = psutil.Process(), threading.Event()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def trial(ctx, kind: str, base: str, model, tok, data: dict, length: int, batch: int, grad_acc: int, out,
          adapter: str | None, rss0: int, warm: int) -> dict:
    """Build the stage's trainer (training.trainer_for) on the loaded base `model` and run `warm` + preflight.steps
    optimizer steps; the base is given back without adapters (models.without_adapters), whatever happened."""
    import torch
    from pipeline.selftest_kit import meter, speed
    cfg, plan = ctx.cfg, ctx.plan
    cuda, steps = plan["device"] == "cuda", cfg.preflight.steps
    args = T.base_args(cfg, kind, plan, out, batch, grad_acc)
    args.update(max_steps=steps + warm, save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True)
    rec, trainer, m = {"batch": batch, "grad_acc": grad_acc, "oom": False}, None, None
    models.release()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    try:
        with RssPeak(rss0) as peak:
            trainer = T.trainer_for(cfg, kind, plan, base, tok, data, length, args, adapter=adapter, base_model=model)
            trainer.args.eval_strategy, trainer.args.eval_on_start = "no", False   # eval-loss passes: predicted
            models.fix_trainable_dtype(trainer.model, plan)
            rec["build_s"] = round(time.monotonic() - t0, 3)
            # the OOM hook, as in fit(); no save
            trainer.add_callback(T.make_callbacks(cfg, kind, steps + warm + 1)[0])
            m = meter(trainer.model, cuda)
            trainer.add_callback(m)
            trainer.train()
        rec.update(speed=speed(m.marks, warm), global_step=trainer.state.global_step)
        timed = rec["speed"]["per_step"][warm:] or rec["speed"]["per_step"]
        rec["s_per_step"] = round(sum(s["seconds"] for s in timed) / len(timed), 4)
        rec["tokens_per_s"] = rec["speed"]["tokens_per_s"]
        rec["peak_mem_gb"] = round((torch.cuda.max_memory_reserved() if cuda else peak.peak - peak.start) / GIB, 3)
        t1 = time.monotonic()
        trainer.save_model(str(out / "adapter"))   # the methods trained from SFT start from SFT's
        rec["save_s"] = round(time.monotonic() - t1, 3)
    except Exception as exc:  # noqa: BLE001 - an allocation failure is this batch's result; the rest re-raise
        if not T.is_oom(exc):
            raise
        rec.update(oom=True, error=(str(exc).splitlines() or [type(exc).__name__])[0][:200])
    finally:   # the meter's hook sits on the base's decoder, which the next trial uses again
        if m is not None:
            m.counter.handle.remove()
        trainer = None
        models.without_adapters(model)
        models.release()
    return rec


def measure(ctx, kind: str, base: str, model, tok, data: dict, length: int, adapter: str | None, rss0: int,
            warm: int) -> dict:
    """Trials from the planned batch down (half the batch, twice the accumulation) until one fits."""
    tc = getattr(ctx.cfg, kind)
    batch, grad_acc, raised = T.first_batch(kind, tc.batch_size, tc.grad_acc)
    out, attempts = ctx.root / "checkpoints" / ".preflight" / kind, []
    while True:
        rec = trial(ctx, kind, base, model, tok, data, length, batch, grad_acc, out, adapter, rss0, warm)
        attempts.append({k: rec.get(k) for k in ("batch", "grad_acc", "oom", "error") if k in rec})
        if not rec["oom"]:
            break
        batch, grad_acc = ranks.halved_after_oom(batch, grad_acc, len(attempts) - 1, f"in the {kind} preflight",
                                                 T.method(kind).min_batch, tc.max_oom_retries)
        ctx.log(f"[yellow]{kind}: out of memory; trying batch {batch} x accumulation {grad_acc}")
    return {**rec, "attempts": attempts, "batch_note": raised, "max_length": length,
            "adapter_dir": str(out / "adapter")}


# --- the stage ----------------------------------------------------------------------------------------------
def row_tokens(tok, row: dict, length: int) -> int:
    """Tokens a row puts through the model in one step, each sequence cut at `length`: the conversation (SFT), prompt +
    chosen and prompt + rejected (the paired methods), prompt + completion (KTO). 0 for an SFT row whose reply starts
    at or after `length`: TRL's SFTTrainer drops it (no loss token left after truncation), so it never trains."""
    def n(msgs: list, **kw) -> int:
        return min(length, len(tok.apply_chat_template(msgs, tokenize=True, **kw)["input_ids"]))
    if "messages" in row:
        msgs = row["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
        if first and n(msgs[:first], add_generation_prompt=True) >= length:
            return 0
        return n(msgs)
    return sum(n(row["prompt"] + row[k]) for k in ("chosen", "rejected", "completion") if k in row)


def stage_data(ctx, kind: str, tok, n: int) -> tuple[dict, int, dict, dict]:
    """A stage's n longest rows (in tokens) as its trainer's datasets, its longest max_length, SFT's eval-loss plan,
    and the rows' token counts against the stage's own rows (`scale`: the planned mean over the trial's)."""
    from datasets import Dataset
    cfg, tc = ctx.cfg, getattr(ctx.cfg, kind)
    length = max([tc.max_length] + [c["max_length"] for c in tc.curriculum])
    if T.method(kind).start == "base":
        split = T.sft_splits(cfg)
        rows = [{"messages": r["messages"]} for r in split["train"]]
        held = [{"messages": r["messages"]} for r in split["eval"]]
        passes = tc.max_steps // tc.eval_steps + (1 if tc.trl.get("eval_on_start") else 0)
        evals = {"passes": passes, "rows": len(held), "eval": Dataset.from_list(held)}
    else:
        paired = ctx.registry[kind].trainer(cfg)[2]
        rows, evals = T.preference_dataset(cfg, kind, tok, paired)[0], {"passes": 0, "rows": 0}
    picked, tokens = pick_rows(tok, rows, n, length)
    data = {"train": Dataset.from_list(picked), **({"eval": evals.pop("eval")} if "eval" in evals else {})}
    return data, length, evals, tokens


def pick_rows(tok, rows: list[dict], n: int, length: int) -> tuple[list[dict], dict]:
    """The n rows with the most tokens at `length` among those the trainer keeps (repeated when there are fewer), and
    their mean token count against all kept rows' (`scale` = planned mean / trial mean: how much cheaper the stage's
    average step is)."""
    sizes = [row_tokens(tok, r, length) for r in rows]
    trains = [i for i, size in enumerate(sizes) if size] or list(range(len(rows)))   # the rows the trainer keeps
    picked = longest(trains, n, sizes.__getitem__)
    trial_mean, planned_mean = sum(sizes[i] for i in picked) / n, sum(sizes[i] for i in trains) / len(trains)
    return [rows[i] for i in picked], {"trial_mean": round(trial_mean, 1), "planned_mean": round(planned_mean, 1),
                                       "scale": round(planned_mean / trial_mean, 4) if trial_mean else 1.0}


def wanted(cfg) -> bool:
    """preflight.enabled, or when unset: on a GPU tier (paid hours; a rehearsal too), or when money is set. The demo
    tier sets it (its Day-1 shows the prediction against the run); on tiny (the tests) it runs when asked."""
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
    t_build = time.monotonic()
    base = models.base_for(cfg)   # the tiny/demo build, once per cache: whichever stage comes first pays it
    base_build_s = round(time.monotonic() - t_build, 3)
    tok, adapter, stages = T.sft_tokenizer(base)[0], None, {}
    models.live_high_water(reset=True)
    rss0, t0 = rss(), time.monotonic()
    model = models.load_model(base, plan, trainable=True, activation_checkpointing=cfg.sft.activation_checkpointing)
    base_load_s = round(time.monotonic() - t0, 3)   # once for the whole preflight; every trial wraps this base
    try:
        for kind in ctx.registry.methods:   # sft first: the others start from the adapter its trial saved
            tc = getattr(cfg, kind)
            warm = warmup_steps(plan, first=not stages)
            n = tc.batch_size * tc.grad_acc * (pf.steps + warm)
            if adapter is not None:
                tok = models.load_tokenizer(adapter)   # as the stages load the SFT final's
            data, length, evals, tokens = stage_data(ctx, kind, tok, n)
            rec = measure(ctx, kind, base, model, tok, data, length, adapter, rss0, warm)
            rec["warmup_steps"], rec["row_tokens"] = warm, tokens
            rec["load_s"] = round(base_load_s + rec["build_s"], 3)   # a stage loads the base and builds its trainer
            subs = len(tc.curriculum) or 1
            # the trial ran on the longest rows (peak memory); the stage's own rows are shorter on average, and a
            # step's cost follows its tokens: the prediction's rate is the measured one x the token ratio
            rec["s_per_step_planned_rows"] = round(rec["s_per_step"] * tokens["scale"], 4)
            rec.update(planned_steps=tc.max_steps, **predict_stage(
                tc.max_steps, rec["s_per_step_planned_rows"], rec["load_s"], subs, rec["save_s"],
                math.ceil(tc.max_steps / tc.save_steps) + subs, evals["passes"],
                math.ceil(evals["rows"] / rec["batch"]), rec["grad_acc"]))
            adapter = adapter or rec.pop("adapter_dir")
            rec.pop("adapter_dir", None)
            stages[kind] = rec
            ctx.log(f"{kind}: batch {rec['batch']} x {rec['grad_acc']}, {rec['s_per_step']} s/step, "
                    f"{rec['tokens_per_s']} tokens/s, peak {rec['peak_mem_gb']} GiB, predicted {rec['predicted_s']} s")
        model.eval()
        evaluation = eval_prediction(ctx, base, model, base_load_s, adapter)
        judging = judge_prediction(ctx, base, model)
    finally:
        model = None
        models.release()
        stages_live, live_after = models.live_high_water(), models.live_models()
        shutil.rmtree(ctx.root / "checkpoints" / ".preflight", ignore_errors=True)
    later = [p["predicted_s"] for p in (evaluation, judging) if p.get("predicted_s") is not None]
    total = round(sum(s["predicted_s"] for s in stages.values()) + sum(later), 2)
    fixed = sum(s["fixed_s"] for s in stages.values()) + sum(later)   # no step count makes these cheaper
    fits, reason = budget_decision(total, fixed, price, budget, {k: s["planned_steps"] for k, s in stages.items()})
    doc = {"device": plan["device"], "steps": pf.steps, "stages": stages,
           "memory_measure": "torch.cuda.max_memory_reserved" if plan["device"] == "cuda" else "peak RSS growth",
           "base_build_s": base_build_s, "base_load_s": base_load_s, "base_loads": 1, "eval": evaluation,
           "judge": judging,
           "predicted_total_s": total, "predicted_cost": cost(total, price), "budget": budget,
           "price_per_hour": price, "fits_budget": fits, "basis": BASIS, "max_live_models": stages_live,
           "live_models_after": live_after,
           "nproc": cfg.runtime.nproc, "rehearsal_fraction": cfg.runtime.rehearsal_fraction, "test_hooks": hooks}
    for line in K.timeline(doc):
        ctx.log(f"predicted: {line}")
    if not fits:
        return {**doc, "status": "failed", "reason": reason, "reason_code": "over_budget"}
    return doc


def guard(cfg, registry, done: list[str], todo: list[str]) -> str | None:
    """Stage.guard, asked by the engine before each later stage of the run once this preflight is ok: the wall
    time measured so far (duration_s of every stage before it in the run) plus this preflight's predictions for the
    stages still to run, against BUDGET (preflight_kit.reproject). Why the run stops before todo[0], or None."""
    pf, root = cfg.preflight, Path(cfg.root)
    doc = ev.read_json(root / STAGE.evidence(cfg))
    if pf.budget is None or not isinstance(doc, dict) or doc.get("status") != "ok":
        return None
    spent = sum(float((ev.read_json(root / registry[n].evidence(cfg)) or {}).get("duration_s") or 0) for n in done)
    decision = K.reproject(spent, K.predictions(doc), todo, pf.price_per_hour, pf.budget)
    return decision["reason"] if decision["stop"] else None

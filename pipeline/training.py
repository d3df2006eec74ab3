"""Shared trainer plumbing for sft/dpo/simpo/kto: gating, data, resume, curriculum, OOM retry, evidence.

Every trainer is TRL's with PEFT LoRA; this module only decides what to load, where to resume, and what
to record. One function per concern, no base classes.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from pipeline import data as D
from pipeline import evidence as ev
from pipeline import ranks
from pipeline import reference
from pipeline.core import SkipStage, StageFailed
from pipeline.training_record import (STATE_FILE, claim_output_dir, latest_checkpoint, training_evidence,
                                      verify_sft_final)

from pipeline.trainer_args import (base_args, for_installed_transformers, lora_config, optimizer_for, precision_args,
                                   sft_tokenizer, trainer_for, trl_config)

# re-exported: the stages, the preflight and the gate use them as training.X
__all__ = ["STATE_FILE", "training_evidence", "base_args", "for_installed_transformers", "optimizer_for",
           "precision_args", "trl_config", "lora_config", "sft_tokenizer", "trainer_for"]

# --- what a training stage reads (its declaration: pipeline/stages/<method>.py) ---------------------------
TRAIN_KEYS = ("max_steps", "learning_rate", "batch_size", "grad_acc", "max_length", "warmup_ratio", "logging_steps",
              "save_steps", "save_total_limit", "optimizer", "activation_checkpointing", "max_oom_retries", "curriculum",
              "trl")
RUN_KEYS = ("model.name", "model.tiny_seed", "runtime.seed", "runtime.nproc", "runtime.deepspeed_config",
            "runtime.force_skip_training", "runtime.rehearsal", "runtime.rehearsal_fraction")
UNTRACKED = ("runtime.report_to", "runtime.inject_oom_at_step", "runtime.inject_oom_rank")   # log sinks, test hooks
ADVICE = ("preflight",)   # a fresh preflight's batch is where a stage starts (start_batch): how it runs, not what
SFT_DATA = ("data.sft_path", "data.sft_format", "data.max_sft_rows", "data.on_bad_row", "data.seed",
            "data.sft_eval_size", "data.judge_heldout_size")
PREFERENCE_DATA = ("data.preference_path", "data.preference_format", "data.max_preference_rows", "data.on_bad_row")


def reads(kind: str, *own: str, data: tuple[str, ...] = PREFERENCE_DATA) -> tuple[str, ...]:
    """The config keys a training stage reads: the run's shared keys, its data keys, its own section's keys."""
    return RUN_KEYS + data + tuple(f"{kind}.{k}" for k in TRAIN_KEYS + own)


def method(kind: str):
    """A training method's declaration (core.Method) from the registry: checkpoint folder, minimum batch, ..."""
    from pipeline.stages import REGISTRY   # here, not at the top: the stage modules import this module
    return REGISTRY[kind].method


def output_dir(cfg, kind: str) -> str:
    """The CONTRACT folder of a method's checkpoints (its final is <folder>/final)."""
    return method(kind).checkpoint.format(slug=cfg.slug)


# --- gating ----------------------------------------------------------------------------------------
def gate(ctx) -> None:
    """Skip (with evidence) before any download: FORCE_SKIP_TRAINING, or a plan that cannot train this tier."""
    if ctx.cfg.runtime.force_skip_training:
        raise SkipStage("FORCE_SKIP_TRAINING=true: training was not run (unset it to train)", code="skip_forced")
    plan = ctx.plan
    if not plan.get("feasible", False):
        free, need = plan.get("free_mem_gb"), plan.get("min_mem_gb")
        short = isinstance(free, (int, float)) and isinstance(need, (int, float)) and free < need
        code = "no_cuda" if plan.get("device") != "cuda" else "too_little_memory" if short else "infeasible_plan"
        raise SkipStage(f"hardware plan: {plan.get('feasible_reason', 'not feasible')}", code=code)


# --- data ------------------------------------------------------------------------------------------
def sft_splits(cfg) -> dict:
    """Deterministic SFT split: judge held-out, eval held-out (eval_loss), train. Same cfg -> same ids."""
    d = cfg.data
    rows, report = D.load_sft(cfg.data_path(d.sft_path), d.sft_format, d.on_bad_row, source="data.sft_path")
    try:
        rest, judge = D.split_heldout(rows, d.judge_heldout_size, d.seed)
        train, held = D.split_heldout(rest, d.sft_eval_size, d.seed + 1)
    except ValueError:   # the held-out sizes do not fit the file: the keys, not the helper's argument
        raise StageFailed(f"{cfg.data_path(d.sft_path)}: {len(rows)} usable rows cannot hold out data.judge_heldout_"
                          f"size={d.judge_heldout_size} for the judge and data.sft_eval_size={d.sft_eval_size} for "
                          "eval loss and still train on one: use a bigger SFT file or smaller held-out sizes") from None
    if cfg.data.max_sft_rows:
        train = train[: cfg.data.max_sft_rows]
    train = train[: rehearsal_rows(cfg, len(train))]
    return {"train": train, "eval": held, "judge": judge, "report": report.to_dict()}


def preference_rows(cfg) -> tuple[list, dict]:
    pairs, report = D.load_preferences(cfg.data_path(cfg.data.preference_path), cfg.data.preference_format,
                                       cfg.data.on_bad_row, source="data.preference_path")
    pairs = pairs[: cfg.data.max_preference_rows or None]
    return pairs[: rehearsal_rows(cfg, len(pairs))], report.to_dict()


def preference_dataset(cfg, kind: str, tok, paired: bool) -> tuple[list, int, list, dict]:
    """A method's training rows in TRL's conversational form (paired, or KTO's unpaired), without those whose prompt
    leaves no answer token within max_length: (rows, dropped, pairs, load report)."""
    tc = getattr(cfg, kind)
    pairs, report = preference_rows(cfg)
    user = lambda text: [{"role": "user", "content": text}]          # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]    # noqa: E731
    if paired:
        rows = [{"prompt": user(p["prompt"]), "chosen": reply(p["chosen"]), "rejected": reply(p["rejected"])} for p in pairs]
    else:
        kto_rows = (D.load_kto(cfg.data_path(cfg.data.kto_path), cfg.data.on_bad_row, source="data.kto_path")[0]
                    if cfg.data.kto_path else D.unpair(pairs))
        rows = [{"prompt": user(r["prompt"]), "completion": reply(r["completion"]), "label": r["label"]} for r in kto_rows]
    # A prompt that fills max_length leaves no answer token: SimPO's length-normalised log-prob is then 0/0.
    room = min([tc.max_length] + [c["max_length"] for c in tc.curriculum]) - 16
    kept = [r for r in rows if len(tok.apply_chat_template(r["prompt"], tokenize=True)["input_ids"]) <= room]
    if not kept:
        raise StageFailed(f"every {kind} prompt is longer than max_length - 16 = {room} tokens: raise {kind}.max_length")
    return kept, len(rows) - len(kept), pairs, report


def rehearsal_rows(cfg, n: int) -> int:
    """A rehearsal trains on the share of the rows its share of the steps would see (pipeline.rehearsal)."""
    return max(2, math.ceil(n * cfg.runtime.rehearsal_fraction)) if cfg.runtime.rehearsal else n


def length_bias(pairs: list) -> dict:
    """Mean chosen vs rejected length in characters: the bundled pairs are length-biased, say so."""
    c = [len(p["chosen"]) for p in pairs]
    r = [len(p["rejected"]) for p in pairs]
    return {"n_pairs": len(pairs), "chosen_mean_chars": round(sum(c) / len(c), 1),
            "rejected_mean_chars": round(sum(r) / len(r), 1),
            "ratio": round((sum(c) / len(c)) / max(1e-9, sum(r) / len(r)), 2)}


# --- the training loop around TRL -------------------------------------------------------------------
# allocation failures that are not torch.OutOfMemoryError: cuBLAS/cuDNN workspaces and bitsandbytes raise RuntimeError
OOM_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "cudaErrorMemoryAllocation",
            "CUDA error: out of memory")


def is_oom(exc: BaseException) -> bool:
    import torch
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError)
                                                       and any(t in str(exc) for t in OOM_TEXT))


def first_batch(kind: str, batch: int, grad_acc: int) -> tuple[int, int, str | None]:
    """The per-device batch a stage can start with: raised to the trainer's minimum, the effective batch kept."""
    return ranks.first_batch(kind, batch, grad_acc, method(kind).min_batch)


def start_batch(ctx, kind: str) -> tuple[int, int, str]:
    """The batch the stage's first attempt uses and why: the planned one (raised to the trainer's minimum), or the
    smaller one a fresh preflight (same fingerprint chain) found when the planned one ran out of memory there."""
    from pipeline.preflight_kit import first_attempt
    tc = getattr(ctx.cfg, kind)
    doc = ctx.advice("preflight") if "preflight" in ctx.stage.advice else None
    batch, grad_acc, why = first_attempt(doc, kind, first_batch(kind, tc.batch_size, tc.grad_acc))
    if why != "as configured":
        ctx.log(f"[yellow]{why}")
    return batch, grad_acc, why


def make_callbacks(cfg, kind: str, stop_at: int):
    import torch
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """End a curriculum sub-stage at its until_step with a checkpoint (the schedule runs on to max_steps);
        stop at the first non-finite loss (fp16 overflow) instead of paying for more steps; the OOM test hook."""
        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            inject, mark = cfg.runtime.inject_oom_at_step, Path(args.output_dir) / f".injected-oom-{step}"
            rank = int(os.environ.get("RANK", "0"))   # torchrun's; the test hook may pick one rank
            if inject and step == inject and not mark.exists() and cfg.runtime.inject_oom_rank in (None, rank):
                mark.touch()   # once per output folder, so a relaunch of the ranks does not fire it again
                raise torch.OutOfMemoryError(f"injected CUDA out of memory at step {step} (MEDLLM_INJECT_OOM_AT_STEP)")
            if step >= stop_at:
                control.should_save = control.should_training_stop = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, float) and not math.isfinite(value):
                    raise StageFailed(f"{kind}: {key} is {value} at step {state.global_step}: training diverged "
                                      f"({'fp16 overflow: Qwen2.5 activations exceed fp16 range; ' if args.fp16 else ''}"
                                      f"lower {kind}.learning_rate, or use a bf16 GPU / QLoRA); stopped early")
    return [StopAt()]


def process_state(plan: dict):
    """accelerate's PartialState: main-process-first, barriers and rank-0 writes (no-ops in one process). Made
    as TrainingArguments makes it (cpu=use_cpu), so the Trainer finds the same state; a rank's is set up
    already (pipeline.train_worker)."""
    from accelerate import PartialState
    return PartialState(cpu=plan["device"] == "cpu")


def prepare(ctx) -> None:
    """Once in the parent, before the engine's runner launches the ranks (core.Stage.prepare): the skip check
    before anything starts, and the base model built once rather than raced by every rank."""
    gate(ctx)
    from pipeline import models
    models.base_for(ctx.cfg)


def fit(ctx, kind: str, build_trainer) -> dict:
    """Run the (curriculum of) sub-stages with auto-resume and OOM retry; return what the evidence needs.

    build_trainer(max_length, args_dict) -> a TRL trainer. Sub-stages are cumulative: each trains to its
    until_step, resuming the previous one's checkpoint (optimizer, scheduler, global_step) under one LR schedule
    over max_steps. One model is alive at a time: the previous trainer is dropped and collected before a rebuild."""
    from pipeline import models
    cfg, tc = ctx.cfg, getattr(ctx.cfg, kind)
    out = ctx.root / output_dir(cfg, kind)
    plan = ctx.plan
    state = process_state(plan)   # one process, or one rank of pipeline.launch's N (the runner chose)
    with state.main_process_first():   # rank 0 claims the folder; the others wait, then see it claimed
        if state.is_main_process:
            claim_output_dir(ctx, out)
    subs = tc.curriculum or [{"max_length": tc.max_length, "until_step": tc.max_steps}]
    batch, grad_acc, why = start_batch(ctx, kind)
    attempts = [{"attempt": 1, "per_device": batch, "grad_acc": grad_acc, "reason": why}]
    oom, reached, trainable = [], [], None
    first = latest_checkpoint(out)   # a checkpoint before we start = a resumed (killed) run
    resumed_from = first.name if first else None
    t0, model = time.monotonic(), None
    for sub in subs:
        while True:
            state.wait_for_everyone()   # every rank sees rank 0's newest checkpoint
            ckpt = latest_checkpoint(out)
            done = ev.read_json(ckpt / STATE_FILE)["global_step"] if ckpt else 0
            if done >= sub["until_step"]:
                break
            model = trainer = None
            models.release()             # the previous sub-stage's (or attempt's) model is gone before the next loads
            failure = None
            try:
                trainer = build_trainer(sub["max_length"], base_args(cfg, kind, plan, out, batch, grad_acc))
                trainable = models.fix_trainable_dtype(trainer.model, plan)
                if plan["precision"] == "fp16" and trainable != "float32":
                    raise StageFailed(f"{kind}: trainable parameters are {trainable} under an fp16 plan; GradScaler "
                                      "needs float32 (pipeline.models.fix_trainable_dtype)")
                trainer.add_callback(make_callbacks(cfg, kind, sub["until_step"])[0])
                trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
                model = trainer.model
                break
            except Exception as exc:  # noqa: BLE001 - only an allocation failure is retried; the rest re-raise
                if not is_oom(exc):
                    raise
                failure = {"step": trainer.state.global_step if trainer is not None else done,
                           "error": str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}
            # outside the except: the traceback no longer pins the frames that hold the model
            del trainer
            model = None
            models.release()
            if state.num_processes > 1:   # a rank cannot retry alone: all stop, the launcher retries them
                raise ranks.RankOOM({"kind": kind, "rank": state.process_index, "batch_size": batch,
                                     "grad_acc": grad_acc, **failure})
            batch, grad_acc = ranks.halved_after_oom(batch, grad_acc, len(oom), f"at step {failure['step']}",
                                                     method(kind).min_batch, tc.max_oom_retries)
            oom.append({"attempt": len(oom) + 1, "batch_size": batch, "grad_acc": grad_acc, **failure,
                        "action": "halved batch, doubled accumulation, resumed"})
            attempts.append({"attempt": len(attempts) + 1, "per_device": batch, "grad_acc": grad_acc,
                             "reason": f"out of memory at step {failure['step']}"})
            ctx.log(f"[yellow]out of memory at step {failure['step']}: retrying with batch {batch} x accumulation {grad_acc}")
        ckpt = latest_checkpoint(out)
        reached.append({"max_length": sub["max_length"], "planned_step": sub["until_step"],
                        "reached_step": ev.read_json(ckpt / STATE_FILE)["global_step"] if ckpt else 0})
    runtime = time.monotonic() - t0
    if not state.is_main_process:   # ranks > 0 stop: rank 0 alone copies the final and writes the evidence
        raise ranks.RankDone
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise StageFailed(f"no valid checkpoint under {out} after training: check reports/logs/{kind}_full.log")
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(ckpt, final, ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*.pth",
                                                                "scaler.pt", "training_args.bin", "ref"))
    state = ev.read_json(final / STATE_FILE)
    return {"state": state, "curriculum": reached if tc.curriculum else [], "oom_retries": oom,
            "resumed_from": resumed_from, "runtime_s": runtime, "final": final, "model": model,
            "batch_size": batch, "grad_acc": grad_acc, "trainable_dtype": trainable,
            "batch": {"requested": {"per_device": tc.batch_size, "grad_acc": tc.grad_acc}, "attempts": attempts},
            "optimizer": dict(zip(("configured", "used", "substitute_reason"), (tc.optimizer, *optimizer_for(tc, plan))))}


# --- DPO / SimPO / KTO: one flow, three TRL trainers ------------------------------------------------
def train_preference(ctx, kind: str, config_cls, trainer_cls, paired: bool, extra_args: dict) -> dict:
    """Start from the verified SFT final, train the SFT adapter further against its frozen copy (TRL adds
    the "ref" adapter itself; pipeline.reference checks it is the SFT final's when training begins), save the final
    adapter and return its evidence."""
    gate(ctx)
    from datasets import Dataset
    from pipeline import models
    cfg, plan, tc = ctx.cfg, ctx.plan, getattr(ctx.cfg, kind)
    start = verify_sft_final(ctx)                      # refuses a tampered or missing SFT final
    sft_dir = ctx.root / start["dir"]
    base = models.base_for(cfg)
    tok = models.load_tokenizer(sft_dir)
    rows, dropped, pairs, report = preference_dataset(cfg, kind, tok, paired)
    tok_len = lambda m: len(tok.apply_chat_template(m, tokenize=True)["input_ids"])   # noqa: E731
    if dropped:
        ctx.log(f"dropped {dropped} rows whose prompt leaves no room for an answer within max_length")
    dataset = Dataset.from_list(rows)
    declared = method(kind).reference   # the registry says which methods compare against a reference
    ref_check = reference.watcher(declared, kind, sft_dir, start["dir"]) if declared != "none" else None

    def build(max_length: int, args: dict):   # the preflight measures the same trainer (trainer_for)
        trainer = trainer_for(cfg, kind, plan, base, tok, {"train": dataset}, max_length, args, adapter=str(sft_dir),
                              classes=(config_cls, trainer_cls, paired, extra_args))
        return ref_check.watch(trainer) if ref_check else trainer

    res = fit(ctx, kind, build)
    out = ctx.root / output_dir(cfg, kind)
    ref = {"reference": ref_check.final(latest_checkpoint(out))} if ref_check else {}
    return training_evidence(ctx, kind, res, base, {
        "base_model_identity": models.base_model_identity(base), "start_checkpoint": start, **ref,
        "tokens_per_sample_estimate": sum(min(tc.max_length, tok_len(r["prompt"] + r.get("chosen", r.get("completion"))))
                                          + (min(tc.max_length, tok_len(r["prompt"] + r["rejected"])) if paired else 0)
                                          for r in rows[:64]) / min(len(rows), 64),
        "data": {"rows": len(rows), "dropped_long_prompts": dropped, "paired": paired, "source": report,
                 "length_bias": length_bias(pairs)},
        "algorithm": {"trainer": trainer_cls.__name__, "beta": tc.beta, **{k: v for k, v in extra_args.items()
                                                                          if isinstance(v, (int, float, str))}},
    })

"""Shared trainer plumbing for sft/dpo/simpo/kto: gating, data, resume, curriculum, OOM retry, evidence.

Every trainer is TRL's with PEFT LoRA; this module only decides what to load, where to resume, and what
to record. One function per concern, no base classes.
"""
from __future__ import annotations

import math
import os
import resource
import shutil
import time
from pathlib import Path

from pipeline import data as D
from pipeline import evidence as ev
from pipeline import ranks
from pipeline.core import SkipStage, StageFailed

# --- what a training stage reads (its declaration: pipeline/stages/<method>.py) ---------------------------
TRAIN_KEYS = ("max_steps", "learning_rate", "batch_size", "grad_acc", "max_length", "warmup_ratio", "logging_steps",
              "save_steps", "save_total_limit", "optimizer", "activation_checkpointing", "max_oom_retries", "curriculum",
              "trl")
RUN_KEYS = ("model.name", "model.tiny_seed", "runtime.seed", "runtime.nproc", "runtime.deepspeed_config",
            "runtime.force_skip_training", "runtime.rehearsal", "runtime.rehearsal_fraction")
UNTRACKED = ("runtime.report_to", "runtime.inject_oom_at_step", "runtime.inject_oom_rank")   # log sinks, test hooks
SFT_DATA = ("data.sft_path", "data.sft_format", "data.max_sft_rows", "data.on_bad_row", "data.seed",
            "data.sft_eval_size", "data.judge_heldout_size")
PREFERENCE_DATA = ("data.preference_path", "data.preference_format", "data.max_preference_rows", "data.on_bad_row")
STATE_FILE = "trainer_state.json"


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
    rows, report = D.load_sft(cfg.data_path(cfg.data.sft_path), cfg.data.sft_format, cfg.data.on_bad_row,
                              source="data.sft_path")
    rest, judge = D.split_heldout(rows, cfg.data.judge_heldout_size, cfg.data.seed)
    train, held = D.split_heldout(rest, cfg.data.sft_eval_size, cfg.data.seed + 1)
    if cfg.data.max_sft_rows:
        train = train[: cfg.data.max_sft_rows]
    train = train[: rehearsal_rows(cfg, len(train))]
    return {"train": train, "eval": held, "judge": judge, "report": report.to_dict()}


def preference_rows(cfg) -> tuple[list, dict]:
    pairs, report = D.load_preferences(cfg.data_path(cfg.data.preference_path), cfg.data.preference_format,
                                       cfg.data.on_bad_row, source="data.preference_path")
    pairs = pairs[: cfg.data.max_preference_rows or None]
    return pairs[: rehearsal_rows(cfg, len(pairs))], report.to_dict()


def rehearsal_rows(cfg, n: int) -> int:
    """A rehearsal trains on the share of the rows its share of the steps would see (settings._rehearse)."""
    return max(2, math.ceil(n * cfg.runtime.rehearsal_fraction)) if cfg.runtime.rehearsal else n


def length_bias(pairs: list) -> dict:
    """Mean chosen vs rejected length in characters: the bundled pairs are length-biased, say so."""
    c = [len(p["chosen"]) for p in pairs]
    r = [len(p["rejected"]) for p in pairs]
    return {"n_pairs": len(pairs), "chosen_mean_chars": round(sum(c) / len(c), 1),
            "rejected_mean_chars": round(sum(r) / len(r), 1),
            "ratio": round((sum(c) / len(c)) / max(1e-9, sum(r) / len(r)), 2)}


# --- checkpoints -----------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """Newest checkpoint-N whose trainer_state.json parses, says step N, and whose adapter is present."""
    best = None
    for d in out.glob("checkpoint-*"):
        state = ev.read_json(d / STATE_FILE)
        try:
            step = int(d.name.split("-")[1])
        except ValueError:
            continue
        if not state or state.get("global_step") != step or not (d / "adapter_model.safetensors").is_file():
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None


def verify_sft_final(ctx) -> dict:
    """DPO/SimPO/KTO start from the SFT final on disk: its files must re-hash to what the SFT metrics recorded."""
    sft = ctx.evidence("sft")
    if not sft or sft.get("status") != "ok":
        raise StageFailed("the SFT metrics are missing or not ok: run `python -m pipeline run sft` first")
    folder = ctx.root / sft["checkpoint_dir"]
    if not folder.is_dir():
        raise StageFailed(f"the SFT final {sft['checkpoint_dir']} is missing: re-run sft (python -m pipeline run sft --force)")
    now = ev.sha256_tree(folder)
    if now != sft["checkpoint_files"]:
        changed = sorted(set(now.items()) ^ set(sft["checkpoint_files"].items()))
        raise StageFailed(f"the SFT final {sft['checkpoint_dir']} does not match the hashes recorded in its metrics "
                          f"(first difference: {changed[0][0]}): refusing to start from it; re-run sft")
    return {"dir": sft["checkpoint_dir"], "checkpoint_sha256": ev.sha256_json(now)}


def claim_output_dir(ctx, out: Path) -> None:
    """Resume only checkpoints of the same fingerprint; checkpoints of another config are moved aside."""
    stamp = out / "FINGERPRINT"
    if out.is_dir() and any(out.iterdir()) and (not stamp.is_file() or stamp.read_text().strip() != ctx.fingerprint):
        aside = out.with_name(out.name + ".stale")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
        ctx.log(f"checkpoints in {out.name} belong to another config: moved to {aside.name}, training from the start")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(ctx.fingerprint + "\n")


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


def precision_args(plan: dict) -> dict:
    on_cpu = plan["device"] == "cpu"
    return {"use_cpu": on_cpu, "bf16": plan["precision"] == "bf16", "fp16": plan["precision"] == "fp16"}


def optimizer_for(tc, plan: dict) -> tuple[str, str | None]:
    """The optimizer that runs here, and why it differs from the config's (8-bit/paged ones need CUDA)."""
    if plan["device"] == "cuda" or "8bit" not in tc.optimizer:
        return tc.optimizer, None
    return "adamw_torch", f"optimizer {tc.optimizer} needs CUDA (bitsandbytes paged/8-bit states): adamw_torch here"


def for_installed_transformers(args: dict, arguments_class=None) -> dict:
    """transformers before the activation_checkpointing rename (5.17, on some GPU images) knows only the
    gradient_checkpointing names; 5.24 mirrors the old names onto the new (transformers/training_args.py:1533-1545)."""
    import dataclasses
    if arguments_class is None:
        from transformers import TrainingArguments as arguments_class
    known = {f.name for f in dataclasses.fields(arguments_class)}
    out = dict(args)
    for new, old in (("activation_checkpointing", "gradient_checkpointing"),
                     ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")):
        if new in out and new not in known:
            out[old] = out.pop(new)
    return out


def base_args(cfg, kind: str, plan: dict, out: Path, batch: int, grad_acc: int) -> dict:
    """TrainingArguments for the whole stage: ONE schedule over max_steps (sub-stages stop early, see StopAt)."""
    tc = getattr(cfg, kind)
    return for_installed_transformers(dict(output_dir=str(out), max_steps=tc.max_steps, learning_rate=tc.learning_rate,
                per_device_train_batch_size=batch, gradient_accumulation_steps=grad_acc,
                warmup_steps=tc.warmup_ratio, logging_steps=tc.logging_steps, save_strategy="steps",
                save_steps=tc.save_steps, save_total_limit=tc.save_total_limit, optim=optimizer_for(tc, plan)[0],
                activation_checkpointing=tc.activation_checkpointing,   # gradient_checkpointing mirrors it
                # non-reentrant: reentrant checkpointing + DDP over a PeftModel fails; every LoRA param gets a grad
                activation_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
                seed=cfg.runtime.seed, data_seed=cfg.runtime.seed,
                report_to=cfg.runtime.report_to,
                deepspeed=str(cfg.data_path(cfg.runtime.deepspeed_config))   # the plan refuses ZeRO-3
                if cfg.runtime.deepspeed_config and not plan.get("rehearsal") else None,
                dataloader_num_workers=0,
                include_num_input_tokens_seen="all", disable_tqdm=False, **precision_args(plan)))


def trl_config(config_cls, kind: str, tc, **ours):
    """The TRL config: our arguments plus `<kind>.trl` verbatim (TRL's config class validates their values); a key
    the class does not know, or one the pipeline sets from its own keys, is a one-line error naming it."""
    import dataclasses
    extra = dict(tc.trl)
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise StageFailed(f"{kind}.trl: {config_cls.__name__} has no field {', '.join(unknown)}: use its field names "
                          f"(TRL's {config_cls.__name__} docs) or remove them from {kind}.trl")
    clash = sorted(set(extra) & set(ours))
    if clash:
        raise StageFailed(f"{kind}.trl sets {', '.join(clash)}, which the pipeline sets from its {kind}.* keys "
                          f"(batch_size, grad_acc, max_length, ...): set them there, not under {kind}.trl")
    try:
        return config_cls(**ours, **extra)
    except (TypeError, ValueError) as exc:
        raise StageFailed(f"{kind}.trl: {config_cls.__name__} refused the values: {exc}") from None


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
    batch, grad_acc, raised = first_batch(kind, tc.batch_size, tc.grad_acc)
    if raised:
        ctx.log(f"[yellow]{raised}")
    attempts = [{"attempt": 1, "per_device": batch, "grad_acc": grad_acc, "reason": raised or "as configured"}]
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


# --- evidence --------------------------------------------------------------------------------------
def curves(state: dict) -> dict:
    """Series from the trainer's own log_history: loss, eval_loss and every reward metric TRL logs."""
    out: dict[str, list] = {}
    for e in state.get("log_history", []):
        for k, v in e.items():
            if k in ("step", "epoch") or not isinstance(v, (int, float)) or k.startswith(("train_", "total_flos")):
                continue
            out.setdefault(k, []).append([e["step"], v])
    return out


def plot(series: dict, keys: list[str], path: Path, title: str) -> str | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in keys if series.get(k)]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        xs, ys = zip(*series[k])
        ax.plot(xs, ys, marker=".", label=k)
    ax.set_xlabel("global step"), ax.set_title(title), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return str(path)


def memory_record(ctx, kind: str) -> dict:
    """Peak memory of this stage (CUDA: reserved by the caching allocator, what nvidia-smi sees and what OOMs;
    CPU: the process's peak RSS), the plan's estimate for the stage beside it, and the live-model high-water."""
    import torch
    from pipeline import models
    plan = ctx.plan
    check = ctx.evidence("gpu_check") or {}
    estimate = ((check.get("plan") or {}).get("memory_estimates") or {}).get(kind) \
        or (check.get("plan") or {}).get("memory_estimate") or {}
    if plan["device"] == "cuda" and torch.cuda.is_available():
        peak, where = torch.cuda.max_memory_reserved() / 2**30, "cuda_max_reserved"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_peak_rss_of_process"
    return {"max_live_models": models.live_high_water(), "peak_gb": round(peak, 3), "peak_kind": where,
            "estimate_gb": estimate.get("total_gb")}


def training_evidence(ctx, kind: str, res: dict, base: str, extra: dict) -> dict:
    from pipeline import models
    cfg, plan, state = ctx.cfg, ctx.plan, res["state"]
    final: Path = res["final"]
    model = res["model"]
    if model is None:   # nothing left to train (a resumed run past its plan): audit the final as trained
        model = models.load_model(base, plan, adapter=str(final), trainable=True)
        res["trainable_dtype"] = models.fix_trainable_dtype(model, plan)
    series = curves(state)
    bad = [(k, step) for k, pts in series.items() for step, v in pts if not math.isfinite(v)]
    if bad:
        raise StageFailed(f"training diverged: {bad[0][0]} is not finite at step {bad[0][1]} (trainer_state.json): "
                          f"lower {kind}.learning_rate or check the data; the checkpoint is not usable")
    figs = [plot(series, ["loss", "eval_loss"], ctx.root / f"reports/figures/{kind}_loss.png", f"{kind} loss"),
            plot(series, [k for k in series if k.startswith(("rewards/", "kl"))],
                 ctx.root / f"reports/figures/{kind}_rewards.png", f"{kind} reward metrics")]
    files = ev.sha256_tree(final)
    rel = final.relative_to(ctx.root).as_posix()
    tokens, token_source = state.get("num_input_tokens_seen") or 0, "trainer num_input_tokens_seen"
    per_sample = extra.pop("tokens_per_sample_estimate", None)
    if not tokens and per_sample:
        tokens = per_sample * res["batch_size"] * res["grad_acc"] * cfg.runtime.nproc * state["global_step"]
        token_source = "estimate: mean tokenized sample length x effective batch x steps"
    reward_keys = [k for k in series if k.startswith(("rewards/", "logps/", "kl"))]
    return {
        "model_name": models.display_name(cfg.tier, base), "base_model": base, "model_tier": cfg.tier,
        "global_step": state["global_step"], "planned_max_steps": getattr(cfg, kind).max_steps,
        "curriculum": res["curriculum"], "loss_curve": series.get("loss", []), "eval_loss_curve": series.get("eval_loss", []),
        "precision": {"dtype": plan["precision"], "quantization": plan.get("quantization"),
                      "attn_implementation": plan["attn_implementation"], "device": plan["device"],
                      "trainable_dtype": res["trainable_dtype"]},
        "dtype_audit": models.dtype_audit(model), "memory": (mem := memory_record(ctx, kind)),
        "peak_mem_gb": mem["peak_gb"], "peak_mem_kind": mem["peak_kind"],
        "batch": res["batch"], "optimizer": res["optimizer"],
        **({"rehearsal": check["rehearsal"]} if (check := ctx.evidence("gpu_check") or {}).get("rehearsal") else {}),
        "tokens_per_s": round(tokens / res["runtime_s"], 2) if tokens and res["runtime_s"] else None,
        "tokens_per_s_source": token_source,
        "train_runtime_s": round(res["runtime_s"], 2), "oom_retries": res["oom_retries"],
        "final_batch_size": res["batch_size"], "final_grad_acc": res["grad_acc"], "resumed_from": res["resumed_from"],
        "checkpoint_dir": rel, "checkpoint_files": files, "checkpoint_sha256": ev.sha256_json(files),
        "trainer_state_file": f"{rel}/{STATE_FILE}", "trainer_state_sha256": files[STATE_FILE],
        "reward_curves": {k: series[k] for k in reward_keys},
        "final_reward_metrics": {k: series[k][-1][1] for k in reward_keys},
        "figures": [f for f in figs if f],
        "outputs": [rel] + [Path(f).relative_to(ctx.root).as_posix() for f in figs if f], **extra}


# --- DPO / SimPO / KTO: one flow, three TRL trainers ------------------------------------------------
def train_preference(ctx, kind: str, config_cls, trainer_cls, paired: bool, extra_args: dict) -> dict:
    """Start from the verified SFT final, train the SFT adapter further against its frozen copy (TRL adds
    the "ref" adapter itself), save the final adapter and return its evidence."""
    gate(ctx)
    from datasets import Dataset
    from pipeline import models
    cfg, plan, tc = ctx.cfg, ctx.plan, getattr(ctx.cfg, kind)
    start = verify_sft_final(ctx)                      # refuses a tampered or missing SFT final
    sft_dir = ctx.root / start["dir"]
    pairs, report = preference_rows(cfg)
    user = lambda text: [{"role": "user", "content": text}]          # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]    # noqa: E731
    if paired:
        rows = [{"prompt": user(p["prompt"]), "chosen": reply(p["chosen"]), "rejected": reply(p["rejected"])} for p in pairs]
    else:
        kto_rows = (D.load_kto(cfg.data_path(cfg.data.kto_path), cfg.data.on_bad_row, source="data.kto_path")[0]
                    if cfg.data.kto_path else D.unpair(pairs))
        rows = [{"prompt": user(r["prompt"]), "completion": reply(r["completion"]), "label": r["label"]} for r in kto_rows]
    base = models.base_for(cfg)
    tok = models.load_tokenizer(sft_dir)
    tok_len = lambda m: len(tok.apply_chat_template(m, tokenize=True)["input_ids"])   # noqa: E731
    # A prompt that fills max_length leaves no answer token: SimPO's length-normalised log-prob is then 0/0.
    room = min([tc.max_length] + [c["max_length"] for c in tc.curriculum]) - 16
    kept = [r for r in rows if tok_len(r["prompt"]) <= room]
    if not kept:
        raise StageFailed(f"every {kind} prompt is longer than max_length - 16 = {room} tokens: raise {kind}.max_length")
    dropped, rows = len(rows) - len(kept), kept
    if dropped:
        ctx.log(f"dropped {dropped} rows whose prompt leaves no room for an answer within max_length")
    dataset = Dataset.from_list(rows)

    def build(max_length: int, args: dict):
        targs = trl_config(config_cls, kind, tc, **args, max_length=max_length, beta=tc.beta, **extra_args)
        model = models.load_model(base, plan, adapter=str(sft_dir), trainable=True,
                                  activation_checkpointing=tc.activation_checkpointing)
        return trainer_cls(model=model, args=targs, train_dataset=dataset, processing_class=tok)

    res = fit(ctx, kind, build)
    return training_evidence(ctx, kind, res, base, {
        "base_model_identity": models.base_model_identity(base), "start_checkpoint": start,
        "tokens_per_sample_estimate": sum(min(tc.max_length, tok_len(r["prompt"] + r.get("chosen", r.get("completion"))))
                                          + (min(tc.max_length, tok_len(r["prompt"] + r["rejected"])) if paired else 0)
                                          for r in rows[:64]) / min(len(rows), 64),
        "data": {"rows": len(rows), "dropped_long_prompts": dropped, "paired": paired, "source": report,
                 "length_bias": length_bias(pairs)},
        "algorithm": {"trainer": trainer_cls.__name__, "beta": tc.beta, **{k: v for k, v in extra_args.items()
                                                                          if isinstance(v, (int, float, str))}},
    })

"""A few optimizer steps of each trainer on the real model, at the longest planned length and batch.

Run: python -m pipeline run gpu_selftest --force      (make gpu-selftest; needs gpu_check)
     MODEL_NAME=random-init python -m pipeline run gpu_selftest --force
         the tier's shape (memory.MODEL_SHAPES) with random weights made on the device: no hub, no file
Writes reports/migration/gpu_selftest.json: per trainer (sft, dpo, simpo, kto) the invariants, the peak
memory beside memory.estimate_memory for that configuration, and tokens/s; ok only if every invariant
holds and nothing crashed. Without CUDA a GPU tier runs the same on the tiny tier's model and says so
(stand_in: true, device: cpu). This file holds the stage (which model, building a trainer, one trial,
run); the random-init model, synthetic rows, meters, memory comparison and invariants are in
pipeline/selftest_kit.py.
Docs: docs/GPU_SELFTEST.md.
"""
from __future__ import annotations

import contextlib
import shutil
import time
import traceback
from pathlib import Path

from pipeline import memory, model_build, models
from pipeline import training as T
from pipeline.core import SkipStage
from pipeline.selftest_kit import (
    GIB, RANDOM_INIT, STEPS, TOKENS_COUNTED, compare_memory, cuda_memory, invariants, meter, random_config,
    random_weights, rows, shape_of, speed, text_ids, verdict)
from pipeline.settings import GPU_TIERS, HUB_MODELS
from pipeline import data as D
from pipeline.core import Stage


STAGE = Stage("gpu_selftest", "reports/migration/gpu_selftest.json", needs=("gpu_check",), in_all=False,
              inputs=D.files("sft_path"), untracked=T.UNTRACKED, reads=(
    *T.RUN_KEYS, *T.SFT_DATA, "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "sft.packing",
    *(f"@methods.{k}" for k in T.TRAIN_KEYS), "@aligned"))


# --- which model -----------------------------------------------------------------------------------
def pick_model(cfg, plan: dict) -> dict:
    """The tier's model; a random-init one of the tier's shape (MODEL_NAME=random-init); without CUDA, a GPU
    tier's stand-in, the tiny tier's model. Random-init and stand-in models use the tiny tier's tokenizer."""
    cuda = plan["device"] == "cuda"
    random = cfg.model.name == RANDOM_INIT
    if random and cfg.tier not in GPU_TIERS:
        raise SkipStage(f"MODEL_NAME={RANDOM_INIT} builds a GPU tier's shape: set MODEL_TIER=7b or 14b")
    if cuda and not random:
        base = models.base_for(cfg)
        return {"source": "tier", "base": base, "tokenizer": base, "stand_in": bool(cfg.runtime.rehearsal),
                "name": models.display_name(cfg.tier, base)}
    folder = model_build.cached_model_dir("tiny", cfg.cache_dir, cfg.model.tiny_seed)
    tiny = str(model_build.build_tiny(folder, seed=cfg.model.tiny_seed))
    if cuda:
        return {"source": RANDOM_INIT, "base": RANDOM_INIT, "tokenizer": tiny, "stand_in": False,
                "shape": dict(memory.MODEL_SHAPES[cfg.tier]),
                "name": f"random-init Qwen2 of {HUB_MODELS[cfg.tier]}'s shape (no pretrained weights)"}
    if cfg.tier in GPU_TIERS:
        return {"source": "stand-in", "base": tiny, "tokenizer": tiny, "stand_in": True,
                "name": f"tiny-qwen2 (random init, {Path(tiny).name}) stands in for {HUB_MODELS[cfg.tier]}: "
                        "no CUDA"}
    base = models.base_for(cfg)
    return {"source": "tier", "base": base, "tokenizer": base, "stand_in": False,
            "name": models.display_name(cfg.tier, base)}



# --- one trainer --------------------------------------------------------------------------------------
def build(kind: str, cfg, plan: dict, base: str, tok, dataset, args: dict, length: int):
    """The trainer the stage builds; DPO/SimPO/KTO get a fresh trainable LoRA where the stages load SFT's."""
    from peft import LoraConfig, get_peft_model
    tc = getattr(cfg, kind)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = models.load_model(base, plan, trainable=True,
                              activation_checkpointing=tc.activation_checkpointing)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer
        sargs = SFTConfig(**args, max_length=length, assistant_only_loss=True, packing=cfg.sft.packing,
                          dataset_num_proc=None)
        return SFTTrainer(model=model, args=sargs, train_dataset=dataset, processing_class=tok,
                          peft_config=lora)
    from pipeline.stages import REGISTRY
    Config, Trainer, _, extra = REGISTRY[kind].trainer(cfg)   # the classes and arguments the stage itself uses
    targs = Config(**args, max_length=length, beta=tc.beta, **extra)
    return Trainer(model=get_peft_model(model, lora), args=targs, train_dataset=dataset,
                   processing_class=tok)



def configuration(kind: str, cfg) -> dict:
    """The longest length the stage plans (its curriculum's too) and the per-device batch fit() starts with
    (KTO's floor of 2 included); one micro-batch per optimizer step: accumulation changes neither peak memory
    nor tokens/s."""
    tc = getattr(cfg, kind)
    batch, grad_acc, raised = T.first_batch(kind, tc.batch_size, tc.grad_acc)
    return {"max_length": max([tc.max_length] + [c["max_length"] for c in tc.curriculum]),
            "per_device_batch": batch, "grad_acc": 1, "grad_acc_planned": grad_acc, "batch_note": raised,
            "sequences_per_example": T.method(kind).sequences_per_example}


def trial(kind: str, cfg, plan: dict, base: str, tok, ids: list[int], out, log=print) -> dict:
    """Build the trainer as the stage would, at configuration(), and train STEPS optimizer steps."""
    import torch
    from datasets import Dataset
    tc, cuda = getattr(cfg, kind), plan["device"] == "cuda"
    rec = {"kind": kind, **configuration(kind, cfg), "optimizer": T.optimizer_for(tc, plan)[0]}
    length, batch = rec["max_length"], rec["per_device_batch"]
    data = Dataset.from_list(rows(kind, batch * STEPS, tok, ids, length))
    args = T.base_args(cfg, kind, plan, out, batch, 1)
    args.update(max_steps=STEPS, save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True)
    models.release()
    rec["live_models_before_load"] = models.live_models()
    models.live_high_water(reset=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer, m, config, t0 = None, None, None, time.monotonic()
    try:
        trainer = build(kind, cfg, plan, base, tok, data, args, length)
        rec["build_s"] = round(time.monotonic() - t0, 2)   # model load + the trainer's own data preparation
        config = trainer.model.config
        rec["trainable_dtype"] = models.fix_trainable_dtype(trainer.model, plan)
        rec["trainer_batch"] = trainer.args.per_device_train_batch_size
        scaler = getattr(trainer.accelerator, "scaler", None)
        rec["grad_scaler"] = type(scaler).__name__ if scaler is not None else None
        if cuda:   # the load's own peak (random-init: the random state dict too) is not the training's
            rec["load_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        m = meter(trainer.model, cuda)
        trainer.add_callback(m)
        trainer.train()
        m.counter.handle.remove()
        rec["train_s"] = round(time.monotonic() - t0 - rec["build_s"], 2)
        rec["global_step"] = trainer.state.global_step
        rec["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        rec["speed"] = speed(m.marks)
        rec["trainer_num_input_tokens_seen"] = trainer.state.num_input_tokens_seen   # padding included
        rec["memory"] = cuda_memory() if cuda else {"measured": False, "why": "no CUDA device"}
    except Exception as exc:  # noqa: BLE001 - a crash is this trainer's result; the others still run
        traceback.print_exc()
        rec["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    finally:
        trainer = m = None
        rec["max_live_models"] = models.live_high_water()
        models.release()
        rec["live_models_after_release"] = models.live_models()
    if config is not None:
        est = memory.estimate_memory(
            shape_of(config), lora_r=cfg.lora.r, target_modules=cfg.lora.target_modules,
            precision=plan["precision"], quantization=plan.get("quantization"), optimizer=rec["optimizer"],
            seq_len=length, batch=batch, activation_checkpointing=tc.activation_checkpointing, stage=kind)
        mem = rec.get("memory") or {}
        rec["estimate"] = {k: v for k, v in est.items() if k.endswith("_gb") or k == "sequences"}
        rec["memory_vs_estimate"] = compare_memory(est, mem.get("peak_reserved_gb"),
                                                   mem.get("peak_allocated_gb"), mem.get("context_gb"))
    rec["invariants"] = invariants(rec, plan)
    rec["ok"] = "error" not in rec and all(rec["invariants"].values())
    log(f"{kind}: {'ok' if rec['ok'] else 'FAILED'} {rec.get('error') or ''} "
        f"tokens/s {(rec.get('speed') or {}).get('tokens_per_s')} memory {rec.get('memory')}")
    return rec



def run(ctx) -> dict:
    cfg, plan = ctx.cfg, ctx.plan
    if plan["device"] == "cuda" and not plan.get("feasible"):
        raise SkipStage(f"hardware plan: {plan.get('feasible_reason')}")
    src = pick_model(cfg, plan)
    tok = models.load_tokenizer(src["tokenizer"])
    if not models.has_generation_markers(tok):   # as the sft stage does (the later stages load its tokenizer)
        from trl.chat_template_utils import get_training_chat_template
        tok.chat_template = get_training_chat_template(tok) or tok.chat_template
    ids = text_ids(cfg, tok)
    work = ctx.root / "checkpoints" / ".gpu_selftest"
    config = random_config(src["shape"], tok) if src["source"] == RANDOM_INIT else None
    with random_weights(config) if config is not None else contextlib.nullcontext():
        records = {k: trial(k, cfg, plan, src["base"], tok, ids, work / k, ctx.log) for k in ctx.registry.methods}
    shutil.rmtree(work, ignore_errors=True)
    status, reason = verdict(records)
    return {"status": status, "reason": reason, "device": plan["device"], "stand_in": src["stand_in"],
            "model": {k: src.get(k) for k in ("source", "name", "shape")},
            "plan": {k: plan.get(k) for k in ("precision", "quantization", "attn_implementation",
                                              "feasible")},
            "steps": STEPS, "trainers": records, "tokens_counted": TOKENS_COUNTED}

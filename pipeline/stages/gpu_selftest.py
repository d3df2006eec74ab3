"""A few optimizer steps of each trainer on the real model, at the longest planned length and batch.

Run: python -m pipeline run gpu_selftest --force      (make gpu-selftest; needs gpu_check)
     MODEL_NAME=random-init python -m pipeline run gpu_selftest --force
         the tier's shape (hardware.MODEL_SHAPES) with random weights made on the device: no hub, no file
Writes reports/migration/gpu_selftest.json: per trainer (sft, dpo, simpo, kto) the invariants, the peak
memory beside hardware.estimate_memory for that configuration, and tokens/s; ok only if every invariant
holds and nothing crashed. Without CUDA a GPU tier runs the same on the tiny tier's model and says so
(stand_in: true, device: cpu).
Docs: docs/GPU_SELFTEST.md.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
import traceback
from pathlib import Path

from pipeline import hardware, models
from pipeline import training as T
from pipeline.core import SkipStage
from pipeline.settings import GPU_TIERS, HUB_MODELS
from pipeline import data as D
from pipeline.core import Stage

STAGE = Stage("gpu_selftest", "reports/migration/gpu_selftest.json", needs=("gpu_check",), in_all=False,
              inputs=D.files("sft_path"), untracked=T.UNTRACKED, reads=(
    *T.RUN_KEYS, *T.SFT_DATA, "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "sft.packing",
    *(f"@methods.{k}" for k in T.TRAIN_KEYS), "@aligned"))

RANDOM_INIT = "random-init"   # MODEL_NAME value: the tier's shape with random weights
STEPS = 3                     # optimizer steps per trainer; the first is the warm-up, tokens/s is the rest's
GIB = 2**30
TOKENS_COUNTED = ("attention-mask sum (no padding) of every forward that builds a graph; the reference and "
                  "KTO's KL forwards run without grad and are not counted; per optimizer step, between the "
                  "ends of steps")
MEMORY_COMPARED = ("like with like: the estimate's total (parts + CUDA context + fragmentation) against peak "
                   "reserved + the CUDA context measured outside the allocator; its parts without overhead "
                   "against peak allocated; peaks from the end of the model load through the steps")


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
    tiny = str(models.build_tiny(models.cached_model_dir("tiny", cfg.cache_dir, cfg.model.tiny_seed),
                                 seed=cfg.model.tiny_seed))
    if cuda:
        return {"source": RANDOM_INIT, "base": RANDOM_INIT, "tokenizer": tiny, "stand_in": False,
                "shape": dict(hardware.MODEL_SHAPES[cfg.tier]),
                "name": f"random-init Qwen2 of {HUB_MODELS[cfg.tier]}'s shape (no pretrained weights)"}
    if cfg.tier in GPU_TIERS:
        return {"source": "stand-in", "base": tiny, "tokenizer": tiny, "stand_in": True,
                "name": f"tiny-qwen2 (random init, {Path(tiny).name}) stands in for {HUB_MODELS[cfg.tier]}: "
                        "no CUDA"}
    base = models.base_for(cfg)
    return {"source": "tier", "base": base, "tokenizer": base, "stand_in": False,
            "name": models.display_name(cfg.tier, base)}


def random_config(shape: dict, tok):
    from transformers import Qwen2Config
    return Qwen2Config(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], vocab_size=max(shape["vocab"], len(tok)),
                       tie_word_embeddings=shape["tied"], bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)


def random_state_dict(config, dtype, device) -> dict:
    """Every weight of `config`'s Qwen2, made on `device`: norms 1, biases 0, others N(0, init range)."""
    import torch
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    gen = torch.Generator(device=device).manual_seed(0)
    out, seen = {}, set()
    for name, meta in skeleton.state_dict(keep_vars=True).items():
        if id(meta) in seen:   # a tied weight (lm_head = embed_tokens) is given once
            continue
        seen.add(id(meta))
        w = torch.empty(meta.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            w.fill_(1.0)
        elif name.endswith(".bias"):
            w.zero_()
        else:
            w.normal_(0.0, config.initializer_range, generator=gen)
        out[name] = w
    return out


@contextlib.contextmanager
def random_weights(config):
    """While open, models.load_model(RANDOM_INIT, plan) builds `config` with random weights made on the plan's
    device: transformers' loader takes them as a state dict (from_pretrained(None, state_dict=...)), so dtype,
    device map, attention and nf4 quantization apply as to real weights; nothing is written or downloaded."""
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM
    own = AutoModelForCausalLM.__dict__.get("from_pretrained")
    real = AutoModelForCausalLM.from_pretrained

    def load(cls, path, *args, **kwargs):
        if str(path) != RANDOM_INIT:
            return real(path, *args, **kwargs)
        where = next(iter((kwargs.get("device_map") or {"": "cpu"}).values()))
        device = f"cuda:{where}" if isinstance(where, int) else where
        weights = random_state_dict(config, kwargs["dtype"], device)
        model = Qwen2ForCausalLM.from_pretrained(None, *args, config=config, state_dict=weights, **kwargs)
        weights.clear()
        model.config.name_or_path = RANDOM_INIT
        return model
    AutoModelForCausalLM.from_pretrained = classmethod(load)
    try:
        yield
    finally:
        if own is None:
            del AutoModelForCausalLM.from_pretrained
        else:
            AutoModelForCausalLM.from_pretrained = own


# --- data: rows that fill the longest planned length -------------------------------------------------
def text_ids(cfg, tok) -> list[int]:
    """Token ids of the bundled SFT conversations, the source of every synthetic row."""
    texts = [m["content"] + "\n" for r in T.sft_splits(cfg)["train"] for m in r["messages"]]
    return [i for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"] for i in ids]


def rows(kind: str, n: int, tok, ids: list[int], length: int) -> list[dict]:
    """n rows whose prompt is a quarter of `length` tokens and whose replies overrun it: every sequence is
    truncated to exactly `length`, so no batch has padding and the memory is the longest planned."""
    ids = ids * math.ceil((2 * length + 128) / max(1, len(ids)))

    def piece(k: int, size: int) -> str:
        start = (k * 7919) % (len(ids) - size)
        return tok.decode(ids[start:start + size])
    out = []
    for i in range(n):
        prompt = [{"role": "user", "content": piece(3 * i, length // 4)}]
        reply = [{"role": "assistant", "content": piece(3 * i + 1, length + 64)}]
        if kind == "sft":
            out.append({"messages": prompt + reply})
        elif T.method(kind).sequences_per_example == 1:   # unpaired (KTO)
            out.append({"prompt": prompt, "completion": reply, "label": i % 2 == 0})
        else:
            out.append({"prompt": prompt, "chosen": reply,
                        "rejected": [{"role": "assistant", "content": piece(3 * i + 2, length + 64)}]})
    return out


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


class TokenCounter:
    """Real tokens (attention-mask sums) of the forwards of `module` that build a graph (no_grad: skipped)."""

    def __init__(self, module):
        self.parts = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        import torch
        if not torch.is_grad_enabled():
            return
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2:
            self.parts.append(mask.sum())     # a device tensor: read at the step's end, no sync per forward
            return
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        self.parts.append(x.shape[0] * x.shape[1])   # padding-free (position_ids): every token is real

    def total(self) -> int:
        return int(sum(int(p) for p in self.parts))


def meter(model, cuda: bool):
    """A callback that marks (wall time, tokens so far) at the first step's start and at every step's end.
    It holds the counter only, never the model: the model goes with the trainer."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def __init__(self, counter):
            self.counter, self.marks = counter, []

        def mark(self):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), self.counter.total()))

        def on_step_begin(self, args, state, control, **kw):
            if not self.marks:
                self.mark()

        def on_step_end(self, args, state, control, **kw):
            self.mark()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return Meter(TokenCounter(inner.get_decoder()))


def speed(marks: list) -> dict:
    steps = [{"seconds": round(t1 - t0, 4), "tokens": n1 - n0}
             for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    timed = steps[1:] or steps   # the first step is the warm-up (kernels, allocator)
    secs = sum(s["seconds"] for s in timed)
    return {"per_step": steps, "tokens": sum(s["tokens"] for s in steps),
            "tokens_per_s": round(sum(s["tokens"] for s in timed) / secs, 2) if secs else None,
            "timed_steps": len(timed)}


def cuda_memory() -> dict:
    import torch
    free, total = torch.cuda.mem_get_info()
    return {"peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GIB, 3),
            "peak_allocated_gb": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "context_gb": round((total - free - torch.cuda.memory_reserved()) / GIB, 3)}


def compare_memory(estimate: dict, reserved_gb, allocated_gb, context_gb) -> dict:
    """The planner's estimate over the measurement (>1: it over-estimates), each side like with like."""
    parts = round(estimate["total_gb"] - estimate["overhead_gb"], 3)
    seen = None if reserved_gb is None or context_gb is None else round(reserved_gb + context_gb, 3)
    return {"estimate_total_gb": estimate["total_gb"], "measured_reserved_plus_context_gb": seen,
            "total_ratio": round(estimate["total_gb"] / seen, 3) if seen else None,
            "estimate_parts_gb": parts, "measured_allocated_gb": allocated_gb,
            "parts_ratio": round(parts / allocated_gb, 3) if allocated_gb else None,
            "compared": MEMORY_COMPARED}


def shape_of(config) -> dict:
    shape = {"hidden": config.hidden_size, "layers": config.num_hidden_layers, "vocab": config.vocab_size,
             "intermediate": config.intermediate_size, "heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "tied": bool(config.tie_word_embeddings)}
    return {**shape, "params": hardware.count_params(shape)}


def invariants(rec: dict, plan: dict) -> dict:
    fp16, losses = plan["precision"] == "fp16", rec.get("losses") or []
    return {"one_live_model_at_load": rec["live_models_before_load"] == 0
            and rec.get("max_live_models", 9) <= 1,
            "trainable_float32_under_fp16": not fp16 or rec.get("trainable_dtype") == "float32",
            # a CPU (a rehearsal of an fp16 GPU) has no loss scaler: accelerate scales on CUDA only
            "grad_scaler_under_fp16": not fp16 or plan.get("device") != "cuda" or bool(rec.get("grad_scaler")),
            "released_after": rec.get("live_models_after_release") == 0,
            "kto_batch_at_least_2": rec["kind"] != "kto" or rec.get("trainer_batch", 0) >= 2,
            "steps_reached": rec.get("global_step") == STEPS,
            "loss_finite": bool(losses) and all(math.isfinite(v) for v in losses),
            "tokens_counted": bool((rec.get("speed") or {}).get("tokens"))}


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
        est = hardware.estimate_memory(
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


def verdict(records: dict) -> tuple[str, str | None]:
    bad = [f"{k}: {r['error']}" if "error" in r else
           f"{k}: invariant(s) failed: {', '.join(n for n, ok in r['invariants'].items() if not ok)}"
           for k, r in records.items() if not r["ok"]]
    return ("ok", None) if not bad else ("failed", "; ".join(bad) + " (reports/logs/gpu_selftest_full.log)")


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

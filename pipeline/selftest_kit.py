"""The GPU self-test's kit (pipeline/stages/gpu_selftest.py runs it): a random-init Qwen2 of a tier's shape
made on the device (random_config, random_weights), synthetic rows that fill the longest planned length, the
token counter and step meter behind tokens/s, the CUDA memory measurement and its comparison with
pipeline.memory.estimate_memory, the invariants each trainer must hold and the verdict over them.
Heavy imports (torch, transformers) stay inside the functions.
"""
from __future__ import annotations

import contextlib
import math
import time

from pipeline import memory
from pipeline import training as T

RANDOM_INIT = "random-init"   # MODEL_NAME value: the tier's shape with random weights
STEPS = 3                     # optimizer steps per trainer; the first is the warm-up, tokens/s is the rest's
GIB = 2**30

TOKENS_COUNTED = ("attention-mask sum (no padding) of every forward that builds a graph; the reference and "
                  "KTO's KL forwards run without grad and are not counted; per optimizer step, between the "
                  "ends of steps")
MEMORY_COMPARED = ("like with like: the estimate's total (parts + CUDA context + fragmentation) against peak "
                   "reserved + the CUDA context measured outside the allocator; its parts without overhead "
                   "against peak allocated; peaks from the end of the model load through the steps")


# --- a random-init model of a tier's shape ----------------------------------------------------------
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


def speed(marks: list, warmup: int = 1) -> dict:
    """Per-step seconds and tokens from the meter's marks; tokens/s over the steps after the `warmup` first ones
    (on CUDA the first step selects kernels and grows the allocator)."""
    steps = [{"seconds": round(t1 - t0, 4), "tokens": n1 - n0}
             for (t0, n0), (t1, n1) in zip(marks, marks[1:])]
    timed = steps[warmup:] or steps
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
    return {**shape, "params": memory.count_params(shape)}


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

def verdict(records: dict) -> tuple[str, str | None]:
    bad = [f"{k}: {r['error']}" if "error" in r else
           f"{k}: invariant(s) failed: {', '.join(n for n, ok in r['invariants'].items() if not ok)}"
           for k, r in records.items() if not r["ok"]]
    return ("ok", None) if not bad else ("failed", "; ".join(bad) + " (reports/logs/gpu_selftest_full.log)")

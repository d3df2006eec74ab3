"""The memory estimate: peak training memory of LoRA/QLoRA on one device, by part, for one training stage.

estimate_memory() is a pure function of the model's shape (MODEL_SHAPES: the tiers' dims) and the training
inputs, so tests and the hardware plan (pipeline.hardware.make_plan) feed it any configuration. The constants
(bytes per param, optimizer states, CUDA context, allocator fragmentation, TRL's logprob tile) live here.
"GB" here means GiB (2**30 bytes), the unit nvidia-smi (MiB) and torch (bytes) report in.
"""
from __future__ import annotations

GIB = 2**30

MODEL_SHAPES = {
    # Qwen/Qwen2.5-7B-Instruct config.json (untied lm_head)
    "7b": {"hidden": 3584, "layers": 28, "intermediate": 18944, "vocab": 152064, "heads": 28, "kv_heads": 4,
           "tied": False, "params": 7.62e9},
    # Qwen/Qwen2.5-14B-Instruct config.json (untied lm_head)
    "14b": {"hidden": 5120, "layers": 48, "intermediate": 13824, "vocab": 152064, "heads": 40, "kv_heads": 8,
            "tied": False, "params": 14.77e9},
    # HuggingFaceTB/SmolLM2-135M-Instruct (tied embeddings)
    "demo": {"hidden": 576, "layers": 30, "intermediate": 1536, "vocab": 49152, "heads": 9, "kv_heads": 3,
             "tied": True, "params": 1.35e8},
    # the locally built random-init Qwen2 of the tiny tier (a few hundred thousand params; size is immaterial)
    "tiny": {"hidden": 64, "layers": 2, "intermediate": 128, "vocab": 512, "heads": 4, "kv_heads": 2,
             "tied": True},
}
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.55          # 4-bit weights + blockwise quantization constants (double-quant), bitsandbytes
OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}   # per trainable param
CUDA_CONTEXT_GB = 0.75    # CUDA context + cuBLAS/cuDNN workspaces: 0.5-1 GB in practice
FRAGMENTATION = 0.05      # the caching allocator keeps ~5% more than is live (with expandable_segments)
# TRL 1.16's fused LM head (trl/trainer/utils.py:1548; SFT, DPO and KTO use it) projects [tokens x vocab]
# in tiles of TOKEN_CHUNK_SIZE x _CHUNKED_LOGPROB_CHUNK_SIZE (trl/kernels/chunked_logprob.py:31,
# trl/trainer/utils.py:1506)
LOGPROB_TILE = (4096, 32768)
# Per training method (its core.Method declaration in pipeline/stages/<method>.py): the sequences per example
# (chosen + rejected concatenated), whether the trainer materialises the full logits, whether it casts QLoRA's
# trainable params to bf16. Under an fp16 plan pipeline.models.fix_trainable_dtype casts them back to fp32.


def traits(stage: str) -> dict:
    """What the memory estimate needs to know about a training method, from the registry."""
    from pipeline.stages import REGISTRY
    m = REGISTRY[stage].method if stage in REGISTRY else None
    if m is None:
        raise ValueError(f"estimate_memory: stage {stage!r} is not one of {', '.join(REGISTRY.methods)}")
    return {"sequences_per_example": m.sequences_per_example, "full_logits": m.full_logits,
            "casts_adapters_bf16": m.casts_adapters_bf16}


def _linear_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear in one decoder layer of a Qwen2/Llama block."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_params(shape: dict) -> float:
    """Total parameters from the dims (biases and norms ignored: <0.1%); used when shape has no "params"."""
    layer = sum(a * b for a, b in _linear_dims(shape).values())
    return float(layer * shape["layers"] + _embed_params(shape))


def _embed_params(shape: dict) -> int:
    return shape["vocab"] * shape["hidden"] * (1 if shape.get("tied") else 2)


def estimate_memory(shape: dict, *, lora_r: int, target_modules: list[str], precision: str,
                    quantization: str | None, optimizer: str, seq_len: int, batch: int,
                    activation_checkpointing: bool, stage: str = "sft") -> dict:
    """Peak training memory of LoRA/QLoRA on one device for one training stage, in GB, by part; the parts
    add up to total_gb. stage sets the sequences per example (chosen + rejected) and how the loss head
    runs."""
    t = traits(stage)
    h, n_layers, vocab = shape["hidden"], shape["layers"], shape["vocab"]
    sequences = batch * t["sequences_per_example"]
    tokens = seq_len * sequences
    params = shape.get("params") or count_params(shape)
    act_bytes = PARAM_BYTES.get(precision, 2) if quantization is None else 2   # QLoRA computes in 16-bit
    dims = _linear_dims(shape)
    embed = _embed_params(shape)
    paired = " x chosen + rejected" if t["sequences_per_example"] == 2 else ""
    assumptions = [f"{stage}: {sequences} sequence(s) of {seq_len} tokens per micro-batch "
                   f"(batch {batch}{paired})."]

    # weights: frozen base model; nf4 quantizes the decoder linears, embeddings and lm_head load 16-bit ...
    upcast = 0
    if quantization == "nf4":
        weights = (params - embed) * NF4_BYTES + embed * 2
        upcast = embed * 2   # ... then peft's k-bit preparation casts them to fp32 (peft/utils/other.py:204)
        assumptions.append(f"weights: decoder linears in nf4 at {NF4_BYTES} bytes/param (incl. quantization "
                           "constants); embeddings and lm_head load 16-bit, then "
                           f"prepare_model_for_kbit_training casts them to fp32: +{upcast / GIB:.1f} GB.")
    else:
        weights = params * PARAM_BYTES[precision]
        assumptions.append(f"weights: {params:.3g} params x {PARAM_BYTES[precision]} bytes ({precision}).")

    # adapters: r * (in + out) per targeted linear per layer, kept in fp32
    names = list(dims) if target_modules in ("all-linear", ["all-linear"]) else \
        [m.rsplit(".", 1)[-1] for m in target_modules]
    unknown = [m for m in names if m not in dims]
    if unknown:
        raise ValueError(f"lora.target_modules names {unknown}, which are not linears of a Qwen2/Llama block "
                         f"({', '.join(dims)}): fix lora.target_modules in the config")
    trainable = lora_r * sum(sum(dims[m]) for m in names) * n_layers
    bf16_lora = quantization is not None and t["casts_adapters_bf16"] and precision != "fp16"
    lora_bytes = 2 if bf16_lora else 4
    adapters = trainable * lora_bytes
    dtype = "bf16 (TRL's trainer casts QLoRA's trainable params to bf16)" if bf16_lora else "fp32"
    assumptions.append(f"adapters: {trainable / 1e6:.1f}M LoRA params (r={lora_r} x (in+out) on "
                       f"{', '.join(names)}, {n_layers} layers) in {dtype}.")
    per_param = 2 * lora_bytes if optimizer == "adamw_torch" else OPTIMIZER_BYTES.get(optimizer, 8)
    optimizer_b = trainable * per_param   # AdamW keeps its two states in the param's dtype
    gradients = trainable * lora_bytes
    assumptions.append(f"optimizer {optimizer}: {per_param} bytes per trainable param; gradients: "
                       f"{lora_bytes} bytes, trainable params only.")

    # activations, elements per token per layer saved for backward (sdpa/flash: no s x s score matrix):
    # 6h (norm in/out, attention in/out, residual) + 2*kv (k, v) + 4*intermediate (gate, up, act, product)
    kv = h // shape["heads"] * shape["kv_heads"]
    per_layer = (6 * h + 2 * kv + 4 * shape["intermediate"]) * tokens * act_bytes
    if activation_checkpointing:   # keep each layer's input (+ residual) and recompute one layer at a time
        activations = 2 * h * n_layers * tokens * act_bytes + per_layer
    else:
        activations = per_layer * n_layers
    kept = ("checkpointed: 2*hidden x layers x tokens x bytes + one full layer" if activation_checkpointing
            else "all layers kept")
    assumptions.append("activations: (6*hidden + 2*kv_dim + 4*intermediate) x tokens x bytes per layer, "
                       f"{kept}.")
    if stage == "kto":
        assumptions.append("KTO: TRL scores the KL completions (kto_trainer.py:815) under torch.no_grad() "
                           "before the policy forward (kto_trainer.py:1364): they keep no activations and "
                           "add nothing to the peak.")

    # the loss head
    if t["full_logits"]:
        loss_head = tokens * vocab * 8
        assumptions.append("loss head: SimPO (CPOTrainer) materialises the logits, which accelerate converts "
                           "to fp32 (convert_outputs_to_fp32), plus their fp32 gradient: 8 bytes x vocab x "
                           "tokens.")
    else:
        rows, cols = min(tokens, LOGPROB_TILE[0]), min(vocab, LOGPROB_TILE[1])
        loss_head = rows * cols * act_bytes + tokens * h * 8
        if quantization:   # the fp32 lm_head is cast to the compute dtype one vocabulary tile at a time
            loss_head += cols * h * act_bytes
        assumptions.append(f"loss head: TRL's fused LM head ({stage}) never builds the logits: one "
                           f"[{rows} x {cols}] {act_bytes}-byte tile + the hidden states and their fp32 "
                           "gradient (8 bytes x hidden x tokens).")

    parts = {"weights_gb": weights, "kbit_upcast_gb": upcast, "adapters_gb": adapters,
             "optimizer_gb": optimizer_b, "gradients_gb": gradients, "activations_gb": activations,
             "loss_head_gb": loss_head}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["overhead_gb"] = CUDA_CONTEXT_GB + FRAGMENTATION * sum(parts.values())
    assumptions.append(f"overhead: {CUDA_CONTEXT_GB} GB CUDA context + {FRAGMENTATION:.0%} allocator "
                       "fragmentation (FRAGMENTATION in pipeline/memory.py).")
    out = {k: round(v, 3) for k, v in parts.items()}
    out["total_gb"] = round(sum(out.values()), 3)
    out.update(stage=stage, seq_len=seq_len, batch=batch, sequences=sequences, assumptions=assumptions)
    return out

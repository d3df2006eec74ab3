"""Hardware probe, memory estimate and the ONE hardware plan every training stage follows.

probe() looks at the machine (nvidia-smi + torch.cuda) and never raises; estimate_memory() and
make_plan() are pure functions of plain dicts, so tests feed them simulated V100/A100/T4/CPU probes.
"GB" here means GiB (2**30 bytes), the unit nvidia-smi (MiB) and torch (bytes) report in.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess

GIB = 2**30
SMI_QUERY = "index,name,memory.total,memory.free,driver_version,compute_cap"

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
    "tiny": {"hidden": 64, "layers": 2, "intermediate": 128, "vocab": 512, "heads": 4, "kv_heads": 2, "tied": True},
}
PARAM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BYTES = 0.55          # 4-bit weights + blockwise quantization constants (double-quant), bitsandbytes
OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_8bit": 2, "adamw_8bit": 2, "sgd": 0}   # per trainable param
CUDA_CONTEXT_GB = 0.75    # CUDA context + cuBLAS/cuDNN workspaces: 0.5-1 GB in practice
FRAGMENTATION = 0.05      # the caching allocator keeps ~5% more than is live


def _linear_dims(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear in one decoder layer of a Qwen2/Llama block."""
    h, i = shape["hidden"], shape["intermediate"]
    kv = h // shape["heads"] * shape["kv_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def count_params(shape: dict) -> float:
    """Total parameters from the dims (biases and norms ignored: <0.1%); used when shape has no "params"."""
    layer = sum(a * b for a, b in _linear_dims(shape).values())
    embed = shape["vocab"] * shape["hidden"] * (1 if shape.get("tied") else 2)
    return float(layer * shape["layers"] + embed)


# ---------------------------------------------------------------- probe
def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {"available": False, "error": "nvidia-smi is not on PATH", "rows": []}
    try:
        out = subprocess.run([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return {"available": False, "error": f"{type(e).__name__}: {e}", "rows": []}
    if out.returncode != 0:
        return {"available": False, "error": f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:500]}",
                "rows": [], "raw": out.stdout}
    keys = SMI_QUERY.split(",")
    rows = [dict(zip(keys, (c.strip() for c in line.split(",")))) for line in out.stdout.splitlines() if line.strip()]
    return {"available": True, "error": None, "rows": rows, "raw": out.stdout}


def _torch_devices(result: dict) -> list[dict]:
    import torch
    result["torch_version"] = torch.__version__
    result["torch_cuda_build"] = torch.version.cuda
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free = torch.cuda.mem_get_info(i)[0] / GIB
        except Exception as e:  # noqa: BLE001 - a busy/locked device must not crash the probe
            free = None
            result["errors"].append(f"torch.cuda.mem_get_info({i}): {type(e).__name__}: {e}")
        try:    # without emulation: a V100 "supports" bf16 only by slow emulation
            with torch.cuda.device(i):
                bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except Exception:  # noqa: BLE001 - older torch without the keyword
            bf16 = p.major >= 8
        devices.append({"index": i, "name": p.name, "capability": [p.major, p.minor],
                        "total_gb": round(p.total_memory / GIB, 2),
                        "free_gb": None if free is None else round(free, 2), "bf16": bf16 and p.major >= 8})
    return devices


def probe() -> dict:
    """Look at the GPUs, the torch build and the optional kernels; record every error, never raise."""
    result = {"cuda_available": False, "torch_version": None, "torch_cuda_build": None, "driver": None,
              "devices": [], "flash_attn": False, "bitsandbytes": False, "bitsandbytes_error": None,
              "nvidia_smi": _nvidia_smi(), "errors": []}
    rows = result["nvidia_smi"]["rows"]
    result["driver"] = rows[0].get("driver_version") if rows else None
    try:
        result["devices"] = _torch_devices(result)
    except Exception as e:  # noqa: BLE001
        result["errors"].append(f"torch: {type(e).__name__}: {e}")
    result["cuda_available"] = bool(result["devices"])
    try:
        result["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError) as e:
        result["errors"].append(f"flash_attn: {type(e).__name__}: {e}")
    try:    # a real import: bitsandbytes can be installed and still fail to load its CUDA library
        import bitsandbytes  # noqa: F401
        result["bitsandbytes"] = True
    except Exception as e:  # noqa: BLE001
        result["bitsandbytes_error"] = f"{type(e).__name__}: {e}"
    return result


# ---------------------------------------------------------------- memory estimate
def estimate_memory(shape: dict, *, lora_r: int, target_modules: list[str], precision: str,
                    quantization: str | None, optimizer: str, seq_len: int, batch: int,
                    activation_checkpointing: bool) -> dict:
    """Peak training memory of LoRA/QLoRA on one device, in GB, by part; the parts add up to total_gb."""
    h, n_layers, tokens = shape["hidden"], shape["layers"], seq_len * batch
    params = shape.get("params") or count_params(shape)
    act_bytes = PARAM_BYTES.get(precision, 2) if quantization is None else 2   # QLoRA computes in 16-bit
    dims = _linear_dims(shape)
    assumptions = []

    # weights: frozen base model; nf4 quantizes the decoder linears, embeddings and lm_head stay 16-bit
    if quantization == "nf4":
        embed = shape["vocab"] * h * (1 if shape.get("tied") else 2)
        weights = (params - embed) * NF4_BYTES + embed * 2
        assumptions.append(f"weights: decoder linears in nf4 at {NF4_BYTES} bytes/param (incl. quantization "
                           "constants); embeddings and lm_head stay 16-bit.")
    else:
        weights = params * PARAM_BYTES[precision]
        assumptions.append(f"weights: {params:.3g} params x {PARAM_BYTES[precision]} bytes ({precision}).")

    # adapters: r * (in + out) per targeted linear per layer, kept in fp32
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if target_modules in ("all-linear", ["all-linear"]) else [m.rsplit(".", 1)[-1] for m in target_modules]
    unknown = [m for m in names if m not in dims]
    if unknown:
        raise ValueError(f"lora.target_modules names {unknown}, which are not linears of a Qwen2/Llama block "
                         f"({', '.join(dims)}): fix lora.target_modules in the config")
    trainable = lora_r * sum(sum(dims[m]) for m in names) * n_layers
    adapters = trainable * 4
    assumptions.append(f"adapters: {trainable / 1e6:.1f}M LoRA params (r={lora_r} x (in+out) on "
                       f"{', '.join(names)}, {n_layers} layers) in fp32.")
    optimizer_b = trainable * OPTIMIZER_BYTES.get(optimizer, 8)
    gradients = trainable * 4
    assumptions.append(f"optimizer {optimizer}: {OPTIMIZER_BYTES.get(optimizer, 8)} bytes per trainable param; "
                       "gradients: fp32, trainable params only.")

    # activations, elements per token per layer saved for backward (sdpa/flash: no s x s score matrix):
    # 6h (norm inputs/outputs, attention in/out, residual) + 2*kv (k, v) + 4*intermediate (gate, up, act, product)
    kv = h // shape["heads"] * shape["kv_heads"]
    per_layer = (6 * h + 2 * kv + 4 * shape["intermediate"]) * tokens * act_bytes
    if activation_checkpointing:   # keep each layer's input (+ residual) and recompute one layer at a time
        layer_acts = 2 * h * n_layers * tokens * act_bytes + per_layer
    else:
        layer_acts = per_layer * n_layers
    logits = tokens * shape["vocab"] * 8   # fp32 logits for the loss + their gradient
    activations = layer_acts + logits
    kept = ("checkpointed: 2*hidden x layers x tokens x bytes + one full layer" if activation_checkpointing
            else "all layers kept")
    assumptions.append(f"activations: (6*hidden + 2*kv_dim + 4*intermediate) x tokens x bytes per layer, {kept}; "
                       "plus fp32 logits and their gradient (8 bytes x vocab x tokens).")

    parts = {"weights_gb": weights, "adapters_gb": adapters, "optimizer_gb": optimizer_b,
             "gradients_gb": gradients, "activations_gb": activations}
    parts = {k: v / GIB for k, v in parts.items()}
    parts["overhead_gb"] = CUDA_CONTEXT_GB + FRAGMENTATION * sum(parts.values())
    assumptions.append(f"overhead: {CUDA_CONTEXT_GB} GB CUDA context + {FRAGMENTATION:.0%} allocator fragmentation.")
    out = {k: round(v, 3) for k, v in parts.items()}
    out["total_gb"] = round(sum(out.values()), 3)
    out["assumptions"] = assumptions
    return out


# ---------------------------------------------------------------- the plan
def make_plan(probe: dict, *, tier: str, want_qlora: bool, want_flash_attn: bool, min_mem_gb: dict,
              estimate_inputs: dict, nproc: int = 1) -> dict:
    """The one plan: device, precision, attention, quantization, and whether the tier fits, each with a reason."""
    downgrades = []
    devices = (probe.get("devices") or []) if probe.get("cuda_available") else []
    used = devices[:max(1, nproc)]
    if devices and nproc > len(devices):
        downgrades.append(f"NPROC={nproc} but only {len(devices)} GPU(s) visible: using {len(used)}")
    cuda = bool(used)
    weakest = min(used, key=lambda d: tuple(d["capability"])) if cuda else None
    sm = f"sm_{weakest['capability'][0]}{weakest['capability'][1]}" if cuda else None
    ampere = cuda and tuple(weakest["capability"]) >= (8, 0)

    # precision
    if not cuda:
        precision, precision_reason = "fp32", "no CUDA device: training runs on the CPU in fp32"
    elif ampere and all(d.get("bf16", True) for d in used):
        precision, precision_reason = "bf16", f"{weakest['name']} ({sm}) is Ampere or newer: bf16"
    else:
        precision, precision_reason = "fp16", f"{weakest['name']} ({sm}) has no native bf16: fp16 mixed precision"
        downgrades.append(f"pre-Ampere GPU ({weakest['name']}, {sm}): bf16 off, fp16 on")

    # quantization (decided before attention: 4-bit rules out flash_attention_2 here)
    quantization, quant_reason = None, "QLoRA not requested (model.qlora=false): 16-bit LoRA"
    if want_qlora and not cuda:
        quant_reason = "QLoRA requested but there is no CUDA device: bitsandbytes 4-bit needs a GPU, no quantization"
        downgrades.append(quant_reason)
    elif want_qlora and not probe.get("bitsandbytes"):
        quant_reason = (f"QLoRA requested but bitsandbytes does not import ({probe.get('bitsandbytes_error')}): "
                        "16-bit LoRA")
        downgrades.append(quant_reason)
    elif want_qlora:
        quantization, quant_reason = "nf4", "QLoRA requested, CUDA and bitsandbytes present: 4-bit nf4 weights"

    # attention
    attn = "sdpa"
    if not want_flash_attn:
        attn_reason = "flash attention not requested (model.flash_attn=false): sdpa"
    elif not cuda:
        attn_reason = "no CUDA device: sdpa"
    elif not ampere:
        attn_reason = f"flash_attention_2 needs Ampere+ (sm_80), {weakest['name']} is {sm}: sdpa"
    elif quantization:
        attn_reason = "4-bit weights: flash_attention_2 is not combined with QLoRA here, sdpa"
    elif not probe.get("flash_attn"):
        attn_reason = "flash_attn is not installed: sdpa (pip install flash-attn for flash_attention_2)"
    else:
        attn, attn_reason = "flash_attention_2", f"flash_attn installed, {sm}, 16-bit weights: flash_attention_2"
    if want_flash_attn and cuda and attn == "sdpa":
        downgrades.append(attn_reason)

    # feasibility
    estimate = estimate_memory(MODEL_SHAPES[tier], precision=precision, quantization=quantization, **estimate_inputs)
    need = min_mem_gb.get(tier)
    free_dev, free = None, None
    if cuda:   # the tightest device decides; a device whose free memory is unknown counts with its total
        free_dev = min(used, key=lambda d: d["total_gb"] if d.get("free_gb") is None else d["free_gb"])
        free = free_dev["total_gb"] if free_dev.get("free_gb") is None else free_dev["free_gb"]
        if free_dev.get("free_gb") is None:
            downgrades.append(f"GPU {free_dev['index']}: free memory unknown, using its total {free} GB")
    feasible, feasible_reason = True, f"the {tier} tier runs on {'GPU' if cuda else 'the CPU'}"
    if tier in min_mem_gb and not cuda:
        feasible = False
        feasible_reason = f"no CUDA device: the {tier} tier needs a GPU with >= {need:g} GB free"
        rows = (probe.get("nvidia_smi") or {}).get("rows") or []
        if rows and not probe.get("torch_cuda_build"):
            feasible_reason += (f"; nvidia-smi sees {len(rows)} GPU(s) ({rows[0].get('name')}) but this torch "
                                f"({probe.get('torch_version')}) is a CPU build: install the CUDA build of torch")
    elif need is not None and free < need:
        feasible = False
        feasible_reason = (f"GPU {free_dev['index']} has {free:.1f} GB free, the {tier} tier needs >= {need:g} GB "
                           f"(MIN_CUDA_MEM_GB_{tier.upper()})")
    elif cuda and estimate["total_gb"] > free:
        feasible = False
        feasible_reason = (f"the memory estimate for {tier} ({precision}, {quantization or 'no quantization'}, "
                           f"seq {estimate_inputs.get('seq_len')}, batch {estimate_inputs.get('batch')}) is "
                           f"{estimate['total_gb']:.1f} GB but GPU {free_dev['index']} has {free:.1f} GB free: "
                           "lower BATCH_SIZE or max_length, or enable QLoRA (model.qlora=true)")

    return {"device": "cuda" if cuda else "cpu", "n_gpus": len(used) if cuda else 0,
            "precision": precision, "bf16": precision == "bf16", "fp16": precision == "fp16",
            "precision_reason": precision_reason, "attn_implementation": attn, "attn_reason": attn_reason,
            "quantization": quantization, "quant_reason": quant_reason, "feasible": feasible,
            "feasible_reason": feasible_reason, "min_mem_gb": need, "free_mem_gb": free,
            "memory_estimate": estimate, "downgrades": downgrades}

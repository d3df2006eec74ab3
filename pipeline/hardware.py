"""Hardware probe, memory estimate and the ONE hardware plan every training stage follows.

probe() looks at the machine (nvidia-smi + torch.cuda) and never raises; load_probe_file() reads a recorded
probe (configs/probes/*.json, GPU_PROBE_FILE) into the same shape. estimate_memory(), make_plan() and
rehearsal_plan() are pure functions of plain dicts, so tests feed them simulated V100/A100/T4/CPU probes.
"GB" here means GiB (2**30 bytes), the unit nvidia-smi (MiB) and torch (bytes) report in.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

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
ARCH_INDEXES = {  # which PyTorch wheel index still (or already) has kernels for a GPU generation
    "old": ("https://download.pytorch.org/whl/cu126", "cu126 builds still carry sm_50-sm_90; "
            "CUDA 12.8+/13 builds dropped Maxwell, Pascal and Volta"),
    "new": ("https://download.pytorch.org/whl/cu128", "cu128 builds add sm_100/sm_120 (Blackwell)")}
PROBE_DIR = "configs/probes"


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
        error = f"nvidia-smi exited {out.returncode}: {out.stderr.strip()[:500]}"
        return {"available": False, "error": error,
                "rows": [], "raw": out.stdout}
    keys = SMI_QUERY.split(",")
    rows = [dict(zip(keys, (c.strip() for c in line.split(","))))
            for line in out.stdout.splitlines() if line.strip()]
    return {"available": True, "error": None, "rows": rows, "raw": out.stdout}


IDENTITY_SMI = ("name", "uuid", "driver_version", "memory.total")   # not free memory: it moves all the time


def machine_identity(visible_devices: str | None) -> dict:
    """What the plan depends on about this machine, found without importing torch: this boot, the GPUs that
    nvidia-smi lists (not their free memory), which of them are visible, and the installed torch, bitsandbytes and
    flash-attn builds. While it is unchanged the recorded probe still holds (`make gpu-check` probes anew)."""
    from importlib import metadata
    boot = Path("/proc/sys/kernel/random/boot_id")
    gpus = None
    if exe := shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run([exe, f"--query-gpu={','.join(IDENTITY_SMI)}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError) as e:
            gpus = f"{type(e).__name__}: {e}"
    builds = {}
    for pkg in ("torch", "bitsandbytes", "flash-attn"):
        try:
            builds[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            builds[pkg] = None
    return {"boot_id": boot.read_text().strip() if boot.is_file() else None, "gpus": gpus,
            "visible_devices": visible_devices, "builds": builds}


def _torch_devices(result: dict) -> list[dict]:
    import torch
    result["torch_version"] = torch.__version__
    result["torch_cuda_build"] = result["cuda_runtime"] = torch.version.cuda
    if not torch.cuda.is_available():
        return []
    result["torch_arch_list"] = list(torch.cuda.get_arch_list())
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
    result = {"source": "live", "cuda_available": False, "torch_version": None, "torch_cuda_build": None,
              "cuda_runtime": None, "torch_arch_list": None, "driver": None, "devices": [],
              "flash_attn": False, "flash_attn_error": None,
              "bitsandbytes": False, "bitsandbytes_error": None, "nvidia_smi": _nvidia_smi(), "errors": []}
    rows = result["nvidia_smi"]["rows"]
    result["driver"] = rows[0].get("driver_version") if rows else None
    try:
        result["devices"] = _torch_devices(result)
    except Exception as e:  # noqa: BLE001
        result["errors"].append(f"torch: {type(e).__name__}: {e}")
    result["cuda_available"] = bool(result["devices"])
    # real imports: find_spec (all transformers checks, transformers/utils/import_utils.py:1324-1336) passes a
    # flash-attn built against another torch, which then crashes at load; bitsandbytes can fail on its CUDA
    # library
    try:
        from flash_attn import flash_attn_func  # noqa: F401
        result["flash_attn"] = True
    except ModuleNotFoundError as e:
        if e.name != "flash_attn":      # installed, but a part of it is missing
            result["flash_attn_error"] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - ImportError (undefined symbol), OSError, RuntimeError
        result["flash_attn_error"] = f"{type(e).__name__}: {e}"
    try:
        import bitsandbytes  # noqa: F401
        result["bitsandbytes"] = True
    except Exception as e:  # noqa: BLE001
        result["bitsandbytes_error"] = f"{type(e).__name__}: {e}"
    return result


# ---------------------------------------------------------------- recorded probes (GPU_PROBE_FILE)
PROBE_FIELDS = ("devices", "driver", "cuda_runtime", "torch_version", "torch_arch_list", "flash_attn",
                "bitsandbytes", "note")
DEVICE_FIELDS = ("name", "capability", "total_gb", "free_gb")
ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")   # sm_70, sm_120, sm_90a, compute_90


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_json(label: str, shown: str, real: Path, missing_fix: str):
    """The parsed JSON of a user-named file, or a one-line ValueError naming it (label: the variable)."""
    if not real.is_file():
        raise ValueError(f"{label} {shown}: no such file ({real}): {missing_fix}")
    try:
        return json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise ValueError(f"{label} {shown}: not valid JSON ({where}): fix the file") from None


def _probe_device(i: int, d, bad) -> dict:
    where = f"devices[{i}]"
    if not isinstance(d, dict):
        bad(where, f"is {d!r}", "use one object per GPU with name, capability, total_gb, free_gb")
    for key in d:
        if key not in DEVICE_FIELDS:
            bad(f"{where}.{key}", "is not a device field",
                f"remove it or fix its spelling ({', '.join(DEVICE_FIELDS)})")
    if not isinstance(d.get("name"), str) or not d["name"].strip():
        bad(f"{where}.name", f"is {d.get('name')!r}",
            'add the GPU name as nvidia-smi prints it ("Tesla V100-SXM2-32GB")')
    cap = d.get("capability")
    ints = isinstance(cap, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in cap)
    if not (ints and len(cap) == 2 and cap[0] >= 1 and cap[1] >= 0):
        bad(f"{where}.capability", f"is {cap!r}",
            "use [major, minor] integers, e.g. [7, 0] for a V100 (nvidia-smi --query-gpu=compute_cap)")
    total, free = d.get("total_gb"), d.get("free_gb")
    if not _number(total) or total <= 0:
        bad(f"{where}.total_gb", f"is {total!r}", "use the card's memory in GiB as a number, e.g. 31.74")
    if not _number(free) or not 0 <= free <= total:
        bad(f"{where}.free_gb", f"is {free!r}",
            f"use the free memory in GiB, a number between 0 and total_gb ({total})")
    return {"index": i, "name": d["name"], "capability": list(cap), "total_gb": float(total),
            "free_gb": float(free), "bf16": tuple(cap) >= (8, 0)}


def load_probe_file(path, resolved=None) -> dict:
    """A recorded probe (configs/probes/*.json) in the shape of probe(). Messages and the evidence show `path`
    as the user gave it; `resolved` (default: path) is what is read. A bad file: a one-line ValueError."""
    shown = str(path)
    doc = _read_json("GPU_PROBE_FILE", shown, Path(resolved or path),
                     f"use one of {PROBE_DIR}/*.json or record your GPU in that format")

    def bad(field: str, problem: str, fix: str):
        raise ValueError(f"GPU_PROBE_FILE {shown}: field '{field}' {problem}: {fix}")

    if not isinstance(doc, dict):
        raise ValueError(f"GPU_PROBE_FILE {shown}: the file must hold a JSON object with the fields "
                         f"{', '.join(PROBE_FIELDS)}: fix the file ({PROBE_DIR}/a100_80g.json is an example)")
    for key in doc:
        if key not in PROBE_FIELDS:
            bad(key, "is not a probe field", f"remove it or fix its spelling ({', '.join(PROBE_FIELDS)})")
    devs = doc.get("devices")
    if not isinstance(devs, list) or not devs:
        bad("devices", f"is {devs!r}",
            'add one object per GPU: [{"name", "capability": [major, minor], "total_gb", "free_gb"}, ...]')
    devices = [_probe_device(i, d, bad) for i, d in enumerate(devs)]
    for key, example in (("driver", '"570.124.06"'), ("cuda_runtime", '"12.8" (torch.version.cuda)'),
                         ("torch_version", '"2.13.0+cu128" (torch.__version__)')):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            bad(key, f"is {doc.get(key)!r}", f"add it as a string, e.g. {example}")
    arch = doc.get("torch_arch_list")
    if not isinstance(arch, list) or not arch:
        bad("torch_arch_list", f"is {arch!r}", 'add torch.cuda.get_arch_list(), e.g. ["sm_80", "sm_90"]')
    for i, a in enumerate(arch):
        if not isinstance(a, str) or not ARCH_RE.match(a):
            bad(f"torch_arch_list[{i}]", f"is {a!r}",
                'use entries like "sm_70" or "compute_90" (torch.cuda.get_arch_list())')
    for key, default in (("flash_attn", False), ("bitsandbytes", True)):
        if not isinstance(doc.get(key, default), bool):
            bad(key, f"is {doc[key]!r}", "use true or false (or leave it out)")
    if not isinstance(doc.get("note", ""), str):
        bad("note", f"is {doc['note']!r}", "use a string or leave it out")
    bnb = doc.get("bitsandbytes", True)   # default true: pinned in requirements.txt
    return {"source": "file", "file": shown, "note": doc.get("note"), "cuda_available": True,
            "torch_version": doc["torch_version"], "torch_cuda_build": doc["cuda_runtime"],
            "cuda_runtime": doc["cuda_runtime"], "torch_arch_list": list(arch), "driver": doc["driver"],
            "devices": devices,
            "flash_attn": doc.get("flash_attn", False),   # default false: flash-attn is not pinned
            "flash_attn_error": None,
            "bitsandbytes": bnb, "bitsandbytes_error": None if bnb else f"{shown} records bitsandbytes=false",
            "nvidia_smi": {"available": None, "error": None, "rows": [],
                           "note": f"not run: the probe is {shown}"},
            "errors": []}


def read_deepspeed_config(path, resolved=None) -> dict:
    """{"file": path as given, "zero_stage": 0-3} of a DeepSpeed JSON config; a bad one: a one-line error."""
    shown = str(path)
    doc = _read_json("DEEPSPEED_CONFIG", shown, Path(resolved or path),
                     "use configs/deepspeed/zero2.json or unset DEEPSPEED_CONFIG")
    zero = doc.get("zero_optimization", {}) if isinstance(doc, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"DEEPSPEED_CONFIG {shown}: field 'zero_optimization.stage' is {stage!r}: "
                         "use an integer 0-3 (configs/deepspeed/zero2.json is an example)")
    return {"file": shown, "zero_stage": stage}


# ---------------------------------------------------------------- torch build vs GPU arch
def arch_supported(capability: list[int], arch_list: list[str] | None) -> bool:
    """Whether a torch built for `arch_list` runs on a GPU of `capability`: an sm_XY cubin runs on the same
    major with minor >= Y (binary compatible; an sm_XYa one only on XY), a compute_XY PTX entry JIT-compiles
    on any capability >= XY. An unknown list (None or []: a CPU probe) is not a failure."""
    if not arch_list:
        return True
    cap = tuple(capability)
    for entry in arch_list:
        m = ARCH_RE.match(entry)
        if not m:
            continue
        kind, built, exact = m.group(1), (int(m.group(2)), int(m.group(3))), bool(m.group(4))
        if kind == "compute" and built <= cap:
            return True
        if kind == "sm" and (built == cap or (not exact and built[0] == cap[0] and built[1] <= cap[1])):
            return True
    return False


def _arch_fix(probe: dict, dev: dict) -> str:
    sm = "sm_{}{}".format(*dev["capability"])
    index, why = ARCH_INDEXES["new" if dev["capability"][0] >= 10 else "old"]
    return (f"torch {probe.get('torch_version')} was built for {', '.join(probe['torch_arch_list'])} and "
            f"has no kernels for GPU {dev['index']} {dev['name']} ({sm}): reinstall torch from an index "
            f"whose build has {sm}, e.g. `TORCH_INDEX_URL={index} TORCH_REINSTALL=true make venv` ({why})")


# ---------------------------------------------------------------- memory estimate
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
                       "fragmentation (FRAGMENTATION in pipeline/hardware.py).")
    out = {k: round(v, 3) for k, v in parts.items()}
    out["total_gb"] = round(sum(out.values()), 3)
    out.update(stage=stage, seq_len=seq_len, batch=batch, sequences=sequences, assumptions=assumptions)
    return out


# ---------------------------------------------------------------- the plan
FP16_RISK = ("fp16 mixed precision: Qwen2.5 was trained in bf16 and some of its activations can exceed "
             "fp16's range (65504) and turn inf/NaN; the loss scaler only guards the gradients. The training "
             "stages stop at the first non-finite loss and name the step; the remedy is a bf16 GPU (Ampere, "
             "sm_80, or newer).")


def _risks(precision: str, quantization) -> list[str]:
    return [FP16_RISK] if precision == "fp16" else []   # fp16 + QLoRA: adapters back to fp32 (fix_trainable_dtype)


def _feasibility(probe: dict, tier: str, need, used: list, free_dev, free, worst: dict, precision: str,
                 quantization, deepspeed) -> tuple[bool, str]:
    """(feasible, reason): the first thing that stops the tier on these GPUs."""
    cuda = bool(used)
    no_arch = [d for d in used if not arch_supported(d["capability"], probe.get("torch_arch_list"))]
    if need is not None and not cuda:
        reason = f"no CUDA device: the {tier} tier needs a GPU with >= {need:g} GB free"
        rows = (probe.get("nvidia_smi") or {}).get("rows") or []
        if rows and not probe.get("torch_cuda_build"):
            reason += (f"; nvidia-smi sees {len(rows)} GPU(s) ({rows[0].get('name')}) but this torch "
                       f"({probe.get('torch_version')}) is a CPU build: install the CUDA build of torch")
        return False, reason
    if no_arch:
        return False, _arch_fix(probe, no_arch[0])
    if (deepspeed or {}).get("zero_stage") == 3:
        return False, (f"DEEPSPEED_CONFIG={deepspeed['file']} is ZeRO stage 3, and transformers refuses a "
                       "device_map under ZeRO-3 (transformers/integrations/accelerate.py:137) while this "
                       "pipeline loads every model with one: for 14b on 2x V100 use QLoRA with DDP "
                       "(QLORA=true NPROC=2, DEEPSPEED_CONFIG unset), or one GPU with enough memory (e.g. an "
                       "80 GB A100/H100); ZeRO-2 (configs/deepspeed/zero2.json) stays allowed")
    if need is not None and free < need:
        return False, (f"GPU {free_dev['index']} has {free:.1f} GB free, the {tier} tier needs >= "
                       f"{need:g} GB (MIN_CUDA_MEM_GB_{tier.upper()})")
    if cuda and worst["total_gb"] > free:
        return False, (f"the memory estimate for {tier} {worst['stage']} ({precision}, "
                       f"{quantization or 'no quantization'}, seq {worst['seq_len']}, "
                       f"batch {worst['batch']}) is {worst['total_gb']:.1f} GB but GPU {free_dev['index']} "
                       f"has {free:.1f} GB free: "
                       "lower BATCH_SIZE or max_length, or enable QLoRA (QLORA=true)")
    return True, f"the {tier} tier runs on {'GPU' if cuda else 'the CPU'}"


def make_plan(probe: dict, *, tier: str, want_qlora: bool, want_flash_attn: bool, min_mem_gb: dict,
              estimate_inputs: dict, nproc: int = 1, stage_inputs: dict | None = None,
              deepspeed: dict | None = None) -> dict:
    """The one plan: device, precision, attention, quantization, and whether the tier fits, each with a
    reason. estimate_inputs are shared by the stages; stage_inputs[stage] overrides them (seq_len, batch,
    optimizer, activation_checkpointing) per training stage (default: sft only); the largest estimate decides.
    deepspeed: read_deepspeed_config() of DEEPSPEED_CONFIG, or None."""
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
        precision = "fp16"
        precision_reason = f"{weakest['name']} ({sm}) has no native bf16: fp16 mixed precision"
        downgrades.append(f"pre-Ampere GPU ({weakest['name']}, {sm}): bf16 off, fp16 on")

    # quantization
    quantization, quant_reason = None, "QLoRA not requested (model.qlora=false): 16-bit LoRA"
    if want_qlora and not cuda:
        quant_reason = ("QLoRA requested but there is no CUDA device: bitsandbytes 4-bit needs a GPU, "
                        "no quantization")
        downgrades.append(quant_reason)
    elif want_qlora and not probe.get("bitsandbytes"):
        quant_reason = ("QLoRA requested but bitsandbytes does not import "
                        f"({probe.get('bitsandbytes_error')}): 16-bit LoRA")
        downgrades.append(quant_reason)
    elif want_qlora:
        quantization = "nf4"
        quant_reason = "QLoRA requested, CUDA and bitsandbytes present: 4-bit nf4 weights"

    # attention (flash-attn works with 4-bit weights: transformers/integrations/flash_attention.py:12-22)
    attn = "sdpa"
    fa_error = probe.get("flash_attn_error")    # set only when flash-attn is installed but does not import
    if not want_flash_attn:
        attn_reason = "flash attention not requested (model.flash_attn=false): sdpa"
    elif not cuda:
        attn_reason = "no CUDA device: sdpa"
    elif not ampere:
        attn_reason = f"flash_attention_2 needs Ampere+ (sm_80), {weakest['name']} is {sm}: sdpa"
    elif not probe.get("flash_attn") and fa_error:
        attn_reason = (f"flash_attn is installed but does not import ({fa_error[:300]}): sdpa (reinstall "
                       "flash-attn built for this torch, or set model.flash_attn=false)")
    elif not probe.get("flash_attn"):
        attn_reason = "flash_attn is not installed: sdpa (pip install flash-attn for flash_attention_2)"
    else:
        attn, attn_reason = "flash_attention_2", f"flash_attn imports, {sm}: flash_attention_2"
    if want_flash_attn and cuda and attn == "sdpa":
        downgrades.append(attn_reason)

    # memory, per training stage
    estimates = {s: estimate_memory(MODEL_SHAPES[tier], precision=precision, quantization=quantization,
                                    stage=s, **{**estimate_inputs, **over})
                 for s, over in (stage_inputs or {"sft": {}}).items()}
    worst = max(estimates.values(), key=lambda e: e["total_gb"])
    need = min_mem_gb.get(tier)
    free_dev, free = None, None
    if cuda:   # the tightest device decides; a device whose free memory is unknown counts with its total
        free_dev = min(used, key=lambda d: d["total_gb"] if d.get("free_gb") is None else d["free_gb"])
        free = free_dev["total_gb"] if free_dev.get("free_gb") is None else free_dev["free_gb"]
        if free_dev.get("free_gb") is None:
            downgrades.append(f"GPU {free_dev['index']}: free memory unknown, using its total {free} GB")
    feasible, feasible_reason = _feasibility(probe, tier, need, used, free_dev, free, worst, precision,
                                             quantization, deepspeed)

    return {"device": "cuda" if cuda else "cpu", "n_gpus": len(used) if cuda else 0,
            "precision": precision, "bf16": precision == "bf16", "fp16": precision == "fp16",
            "precision_reason": precision_reason, "attn_implementation": attn, "attn_reason": attn_reason,
            "quantization": quantization, "quant_reason": quant_reason, "feasible": feasible,
            "feasible_reason": feasible_reason, "min_mem_gb": need, "free_mem_gb": free,
            "memory_estimate": estimates.get("sft", worst), "memory_estimates": estimates,
            "deepspeed": deepspeed, "risks": _risks(precision, quantization), "downgrades": downgrades}


# ---------------------------------------------------------------- the rehearsal plan
def rehearsal_plan(plan: dict, probe: dict, *, optimizers: dict | None = None) -> tuple[dict, list[str]]:
    """The plan a CPU rehearsal of `plan` executes, and every way that run differs from the GPU run, as
    sentences. optimizers: {stage: optimizer name} from the config (8-bit/paged ones are swapped on a CPU)."""
    run = dict(plan, rehearsal=True, device="cpu")
    gpus = ", ".join(sorted({d["name"] for d in (probe.get("devices") or [])})) or "no GPU"
    where = probe.get("file") or probe.get("source") or "the probe"
    diffs = [f"device: cuda ({gpus}, from {where}) -> cpu: every kernel is the CPU one (no cuBLAS, cuDNN or "
             "Triton; TRL's fused LM head folds its tiles in torch and scores every position, "
             "trl/trainer/utils.py:1642), so tokens_per_s says nothing about the GPU",
             "the model is a random-init stand-in, not the tier's hub model: losses, rewards and eval scores "
             "only show that the pipeline runs",
             "peak memory is the CPU RSS, not CUDA reserved memory; the plan's memory_estimates are the "
             "GPU's"]
    if plan["precision"] == "fp16":
        diffs.append("fp16 mixed precision: on a CPU accelerate runs no autocast and no GradScaler "
                     "(accelerate/accelerator.py:565-570 turns native AMP on only off the CPU), nor converts "
                     "the outputs to fp32 (accelerate/accelerator.py:1824-1835); the fp16 weights compute in "
                     "fp16 directly, and trainable dtypes are asserted instead")
        diffs.append("fp16 generation (eval, judge answers, the gate's probes) loads the stand-in in fp32: CPU fp16 "
                     "GEMMs are ~10x slower than fp32; training keeps the plan's fp16 weights")
    elif plan["precision"] == "bf16":
        diffs.append("bf16 mixed precision: accelerate runs CPU autocast "
                     "(accelerate/accelerator.py:590-591), not CUDA autocast; bf16 CPU matmuls are not "
                     "bit-identical to cuBLAS")
    if plan["attn_implementation"] == "flash_attention_2":
        run.update(attn_implementation="sdpa", attn_reason="rehearsal on the CPU: flash_attention_2 -> sdpa")
        diffs.append("flash_attention_2 -> sdpa: flash-attn has no CPU kernels; sdpa computes the same "
                     "attention, not bit-identically")
    if plan["quantization"] == "nf4":
        diffs.append("nf4: bitsandbytes 0.50 quantizes and runs the 4-bit matmuls with its CPU backend, not "
                     "its CUDA kernels: same format and code path in transformers/peft, other kernels; its "
                     "CPU-only eval-mode weight repack is turned off (pipeline.models.load_model)")
    if plan.get("n_gpus", 0) > 1:
        diffs.append(f"NCCL -> gloo: the {plan['n_gpus']} processes run on CPU cores and all-reduce over "
                     "gloo (accelerate/state.py:800-813), not NCCL (accelerate/state.py:788-790)")
    if plan.get("deepspeed"):
        run["deepspeed"] = None
        diffs.append(f"DeepSpeed ZeRO-{plan['deepspeed']['zero_stage']} ({plan['deepspeed']['file']}) is not "
                     "run on the CPU: the rehearsal trains with plain DDP")
    swapped: dict[str, list[str]] = {}
    for stage, name in (optimizers or {}).items():
        if "8bit" in name:
            swapped.setdefault(name, []).append(stage)
    for name, stages in swapped.items():
        diffs.append(f"{name} -> adamw_torch ({', '.join(stages)}): the training stages use bitsandbytes' "
                     "paged/8-bit optimizers only on CUDA")
    return run, diffs

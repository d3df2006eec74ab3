"""Hardware probe and the ONE hardware plan every training stage follows.

probe() looks at the machine (nvidia-smi + torch.cuda) and never raises; machine_identity() says, without
importing torch, whether a recorded probe still holds. make_plan() and rehearsal_plan() are pure functions of
plain dicts, so tests feed them simulated V100/A100/T4/CPU probes. The memory estimate the plan checks lives
in pipeline.memory, the recorded-probe and DeepSpeed files in pipeline.probe_files (both re-exported here).
"GB" here means GiB (2**30 bytes), the unit nvidia-smi (MiB) and torch (bytes) report in.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipeline.memory import (   # re-exported (__all__): hardware.X stays importable
    CUDA_CONTEXT_GB, FRAGMENTATION, GIB, LOGPROB_TILE, MODEL_SHAPES, NF4_BYTES, OPTIMIZER_BYTES, PARAM_BYTES,
    count_params, estimate_memory, traits)
from pipeline.probe_files import (   # re-exported (__all__)
    ARCH_RE, DEVICE_FIELDS, PROBE_DIR, PROBE_FIELDS, load_probe_file, read_deepspeed_config)

__all__ = ["CUDA_CONTEXT_GB", "FRAGMENTATION", "GIB", "LOGPROB_TILE", "MODEL_SHAPES", "NF4_BYTES",
           "OPTIMIZER_BYTES", "PARAM_BYTES", "count_params", "estimate_memory", "traits", "ARCH_RE",
           "DEVICE_FIELDS", "PROBE_DIR", "PROBE_FIELDS", "load_probe_file", "read_deepspeed_config",
           "SMI_QUERY", "IDENTITY_SMI", "ARCH_INDEXES", "FP16_RISK", "machine_identity", "probe",
           "arch_supported", "make_plan", "rehearsal_plan"]

SMI_QUERY = "index,name,memory.total,memory.free,driver_version,compute_cap"

ARCH_INDEXES = {  # which PyTorch wheel index still (or already) has kernels for a GPU generation
    "old": ("https://download.pytorch.org/whl/cu126", "cu126 builds still carry sm_50-sm_90; "
            "CUDA 12.8+/13 builds dropped Maxwell, Pascal and Volta"),
    "new": ("https://download.pytorch.org/whl/cu128", "cu128 builds add sm_100/sm_120 (Blackwell)")}


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

"""The hardware files a user names: a recorded probe (GPU_PROBE_FILE, configs/probes/*.json) and a DeepSpeed
config (DEEPSPEED_CONFIG), each read into the shape the hardware plan takes; a bad file is a one-line
ValueError that names the file, the field and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PROBE_DIR = "configs/probes"

PROBE_FIELDS = ("devices", "driver", "cuda_runtime", "torch_version", "torch_arch_list", "flash_attn",
                "bitsandbytes", "note", "driver_cuda")   # driver_cuda: optional, nvidia-smi's "CUDA Version"
DEVICE_FIELDS = ("name", "capability", "total_gb", "free_gb")
ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)([a-z]?)$")   # sm_70, sm_120, sm_90a, compute_90
DRIVER_RE = re.compile(r"^\d+\.\d+(\.\d+)?$")                 # 570.124.06, 570.26
CUDA_RE = re.compile(r"^\d+\.\d+$")                             # 12.8


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
    if not DRIVER_RE.match(doc["driver"]):
        bad("driver", f"is {doc['driver']!r}", 'use the driver version nvidia-smi prints, e.g. "570.124.06"')
    if "driver_cuda" in doc and not (isinstance(doc["driver_cuda"], str) and CUDA_RE.match(doc["driver_cuda"])):
        bad("driver_cuda", f"is {doc['driver_cuda']!r}",
            'use the "CUDA Version" nvidia-smi prints, e.g. "12.8", or leave it out')
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
            "driver_cuda": doc.get("driver_cuda"),   # None: pipeline.torch_fit uses NVIDIA's driver table
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

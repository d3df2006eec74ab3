"""What a training stage records and trusts: its checkpoints (resume, the SFT final it starts from, the output
folder it claims) and its evidence (curves from the trainer's own log, figures, memory, the metrics document).
pipeline.training re-exports these names; the training loop itself is there.
"""
from __future__ import annotations

import json
import math
import os
import resource
import shutil
from pathlib import Path

from pipeline import evidence as ev
from pipeline.core import StageFailed

STATE_FILE = "trainer_state.json"


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


def start_stage(stage) -> str:
    """The stage whose final a method trains on from: its Method.start, or a seed replicate's (pipeline/seeds.py)."""
    return stage.replicate.start if stage.replicate else stage.method.start


def verify_sft_final(ctx) -> dict:
    """DPO/SimPO/KTO start from the SFT final on disk: its files must re-hash to what the SFT metrics recorded."""
    name = start_stage(ctx.stage)
    sft = ctx.evidence(name)
    if not sft or sft.get("status") != "ok":
        raise StageFailed(f"the SFT metrics are missing or not ok: run `python -m pipeline run {name}` first")
    folder = ctx.root / sft["checkpoint_dir"]
    if not folder.is_dir():
        raise StageFailed(f"the SFT final {sft['checkpoint_dir']} is missing: re-run {name} "
                          f"(python -m pipeline run {name} --force)")
    now, diff = ev.verify_tree(folder, sft["checkpoint_files"])
    if diff:
        kind, paths = next(iter(diff.items()))
        raise StageFailed(f"the SFT final {sft['checkpoint_dir']} does not match the hashes recorded in its metrics "
                          f"(first difference: {paths[0]}, {kind}): refusing to start from it; re-run sft")
    return {"dir": sft["checkpoint_dir"], "checkpoint_sha256": ev.sha256_json(now)}


def claim_output_dir(ctx, out: Path) -> None:
    """Resume only checkpoints of the same fingerprint. Checkpoints of another config are kept aside as
    <folder>.stale-<their fingerprint>, never deleted (`make prune` does that, saying what it frees), and are
    restored when their config runs again: an attempt with other settings that fails loses nothing finished."""
    stamp = out / "FINGERPRINT"
    if out.is_dir() and any(out.iterdir()):
        theirs = stamp.read_text().strip() if stamp.is_file() else ""
        if theirs != ctx.fingerprint:
            aside = _free_name(out.with_name(f"{out.name}{STALE}{theirs[:16] or 'unstamped'}"))
            os.replace(out, aside)
            ctx.log(f"checkpoints in {out.name} belong to another config: kept aside as {aside.name} (restored when "
                    "that config runs again; `make prune` deletes such folders)")
    mine = out.with_name(f"{out.name}{STALE}{ctx.fingerprint[:16]}")
    if not out.exists() and mine.is_dir():
        os.replace(mine, out)
        ctx.log(f"restored {mine.name}: the checkpoints of this config, kept aside by an earlier attempt; resuming")
    out.mkdir(parents=True, exist_ok=True)
    ev.atomic_write_text(stamp, ctx.fingerprint + "\n")


STALE = ".stale-"   # <checkpoint folder>.stale-<fingerprint[:16]>: another config's checkpoints, kept


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def stale_folders(root: Path) -> list[Path]:
    """Checkpoint folders kept aside for another config (and the old single `.stale` ones)."""
    base = root / "checkpoints"
    return sorted(p for p in base.rglob("*.stale*") if p.is_dir() and (STALE in p.name or p.name.endswith(".stale")))


def prune(root: Path) -> list[tuple[str, int]]:
    """Delete the kept-aside checkpoint folders; (folder, bytes freed) for each."""
    out = []
    for p in stale_folders(root):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        shutil.rmtree(p)
        out.append((p.relative_to(root).as_posix(), size))
    return out


# --- evidence --------------------------------------------------------------------------------------
def portable_final(final: Path, root: Path, base: str) -> None:
    """PEFT writes the base model's path into the final's adapter_config.json (base_model_name_or_path) and model
    card (README.md). A base inside the root (the tiny/demo cache) is written there relative to the root, so a
    final names nothing outside a moved or copied root; a hub id or a folder elsewhere stays as it is. No loader
    reads the field: each one passes the base model it verified (models.load_model, then the adapter)."""
    rel = ev.root_relative(root, base)
    config, card = final / "adapter_config.json", final / "README.md"
    if rel == base:
        return
    doc = ev.read_json(config)
    if isinstance(doc, dict) and doc.get("base_model_name_or_path") == base:
        ev.atomic_write_text(config, json.dumps({**doc, "base_model_name_or_path": rel}, indent=2, sort_keys=True))
    if card.is_file() and base in (text := card.read_text(encoding="utf-8")):
        ev.atomic_write_text(card, text.replace(base, rel))


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
    where = f"{ctx.stage.replicate.reports}/figures" if ctx.stage.replicate else "reports/figures"
    figs = [plot(series, ["loss", "eval_loss"], ctx.root / f"{where}/{kind}_loss.png", f"{ctx.name} loss"),
            plot(series, [k for k in series if k.startswith(("rewards/", "kl"))],
                 ctx.root / f"{where}/{kind}_rewards.png", f"{ctx.name} reward metrics")]
    figs = [ev.root_relative(ctx.root, f) for f in figs if f]
    portable_final(final, ctx.root, base)
    files = ev.sha256_tree(final)
    rel = final.relative_to(ctx.root).as_posix()
    tokens, token_source = state.get("num_input_tokens_seen") or 0, "trainer num_input_tokens_seen"
    per_sample = extra.pop("tokens_per_sample_estimate", None)
    if not tokens and per_sample:
        tokens = per_sample * res["batch_size"] * res["grad_acc"] * cfg.runtime.nproc * state["global_step"]
        token_source = "estimate: mean tokenized sample length x effective batch x steps"
    reward_keys = [k for k in series if k.startswith(("rewards/", "logps/", "kl"))]
    return {
        "model_name": models.display_name(cfg.tier, base), "base_model": ev.root_relative(ctx.root, base),
        "model_tier": cfg.tier,
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
        "figures": figs, "outputs": [rel] + figs, **extra}

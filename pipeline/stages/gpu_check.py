"""Hardware probe and the one hardware plan (precision, attention, quantization, feasibility, memory estimate).

Run: python -m pipeline run gpu_check   (make gpu-check)
Never fails on a CPU: a GPU tier that does not fit is recorded as plan.feasible=false, and the training
stages skip on that with evidence. Later stages read the plan as ctx.plan.
"""
from __future__ import annotations

from pipeline.hardware import make_plan, probe


def describe(probe_: dict, plan: dict, tier: str) -> list[str]:
    """The plan in sentences, for the console and the evidence."""
    if probe_["devices"]:
        lines = [f"GPU {d['index']}: {d['name']} (sm_{d['capability'][0]}{d['capability'][1]}), "
                 f"{d['free_gb']} of {d['total_gb']} GB free" for d in probe_["devices"]]
    else:
        lines = [f"no CUDA device (torch {probe_.get('torch_version')}, CUDA build {probe_.get('torch_cuda_build')})"]
    est = plan["memory_estimate"]
    lines += [f"precision: {plan['precision']} - {plan['precision_reason']}",
              f"attention: {plan['attn_implementation']} - {plan['attn_reason']}",
              f"quantization: {plan['quantization'] or 'none'} - {plan['quant_reason']}",
              f"memory estimate: {est['total_gb']:.1f} GB (weights {est['weights_gb']:.1f}, "
              f"activations {est['activations_gb']:.1f}, optimizer {est['optimizer_gb']:.2f})"]
    lines += [f"downgrade: {d}" for d in plan["downgrades"]]
    lines.append(f"tier {tier}: {'feasible' if plan['feasible'] else 'NOT feasible'} - {plan['feasible_reason']}")
    return lines


def run(ctx) -> dict:
    # ---- the config fields this stage reads (adapt names here only)
    cfg = ctx.cfg
    tier = cfg.tier
    min_mem_gb = {"7b": cfg.runtime.min_cuda_mem_gb_7b, "14b": cfg.runtime.min_cuda_mem_gb_14b}
    estimate_inputs = {"lora_r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules),
                       "optimizer": cfg.sft.optimizer, "seq_len": cfg.sft.max_length, "batch": cfg.sft.batch_size,
                       "activation_checkpointing": cfg.sft.activation_checkpointing}

    found = probe()
    plan = make_plan(found, tier=tier, want_qlora=cfg.model.qlora, want_flash_attn=cfg.model.flash_attn,
                     min_mem_gb=min_mem_gb, estimate_inputs=estimate_inputs, nproc=cfg.runtime.nproc)
    messages = describe(found, plan, tier)

    from rich.markup import escape
    for line in messages:
        style = "yellow" if line.startswith("downgrade") else ("red" if "NOT feasible" in line else "")
        ctx.console.print(f"[{style}]{escape(line)}[/]" if style else escape(line))
    return {"probe": found, "plan": plan, "messages": messages}

"""Hardware probe and the one hardware plan (precision, attention, quantization, feasibility, memory).

Run: python -m pipeline run gpu_check   (make gpu-check; GPU_PROBE_FILE=configs/probes/<gpu>.json plans for
a recorded GPU instead of this machine)
Never fails on a CPU: a GPU tier that does not fit is recorded as plan.feasible=false, and the training
stages skip on that with evidence. Later stages read the plan as ctx.plan. In a rehearsal (REHEARSAL=true)
the evidence also has run_plan, the CPU plan the rehearsal executes, and rehearsal.differences.
"""
from __future__ import annotations

from pipeline import hardware as hw
from pipeline.settings import HUB_MODELS
from pipeline.core import Stage

def machine(cfg) -> dict:
    from pipeline.settings import environment
    return hw.machine_identity(environment().get("CUDA_VISIBLE_DEVICES"))


# machine-dependent: up to date only while machine() is unchanged (same boot, GPUs, builds); make gpu-check forces it
STAGE = Stage("gpu_check", "reports/migration/gpu_check.json", machine=machine, in_dry_run=True, reads=(
    "lora.r", "lora.target_modules", "model.flash_attn", "model.qlora", "model.tiny_seed", "runtime.deepspeed_config",
    "runtime.gpu_probe_file", "runtime.min_cuda_mem_gb_7b", "runtime.min_cuda_mem_gb_14b", "runtime.nproc",
    "runtime.rehearsal", "runtime.rehearsal_changes", "@methods.activation_checkpointing", "@methods.batch_size",
    "@methods.curriculum", "@methods.max_length", "@methods.optimizer"),
    inputs=lambda cfg: [cfg.data_path(p) for p in (cfg.runtime.gpu_probe_file, cfg.runtime.deepspeed_config) if p])


def stage_inputs(cfg) -> dict:
    """Per training stage: its longest sequence (max_length or a longer curriculum step) and its batch."""
    from pipeline.stages import REGISTRY
    out = {}
    for stage in REGISTRY.methods:
        tc = getattr(cfg, stage)
        out[stage] = {"seq_len": max([tc.max_length] + [c["max_length"] for c in tc.curriculum]),
                      "batch": tc.batch_size, "optimizer": tc.optimizer,
                      "activation_checkpointing": tc.activation_checkpointing}
    return out


def plan_inputs(cfg, deepspeed: dict | None = None) -> dict:
    """The keyword arguments of hardware.make_plan for this config (everything but the probe)."""
    return {"tier": cfg.tier, "want_qlora": cfg.model.qlora, "want_flash_attn": cfg.model.flash_attn,
            "min_mem_gb": {"7b": cfg.runtime.min_cuda_mem_gb_7b, "14b": cfg.runtime.min_cuda_mem_gb_14b},
            "estimate_inputs": {"lora_r": cfg.lora.r, "target_modules": list(cfg.lora.target_modules)},
            "stage_inputs": stage_inputs(cfg), "nproc": cfg.runtime.nproc, "deepspeed": deepspeed}


def describe(probe_: dict, plan: dict, tier: str) -> list[str]:
    """The plan in sentences, for the console and the evidence."""
    lines = [f"probe: recorded in {probe_['file']}" + (f" ({probe_['note']})" if probe_.get("note") else "")
             ] if probe_.get("source") == "file" else []
    if probe_["devices"]:
        lines += [f"GPU {d['index']}: {d['name']} (sm_{d['capability'][0]}{d['capability'][1]}), "
                  f"{d['free_gb']} of {d['total_gb']} GB free" for d in probe_["devices"]]
        lines.append(f"torch {probe_.get('torch_version')}, CUDA {probe_.get('torch_cuda_build')}, built for "
                     f"{', '.join(probe_.get('torch_arch_list') or ['?'])}")
    else:
        lines.append(f"no CUDA device (torch {probe_.get('torch_version')}, "
                     f"CUDA build {probe_.get('torch_cuda_build')})")
    lines += [f"precision: {plan['precision']} - {plan['precision_reason']}",
              f"attention: {plan['attn_implementation']} - {plan['attn_reason']}",
              f"quantization: {plan['quantization'] or 'none'} - {plan['quant_reason']}"]
    for stage, est in plan["memory_estimates"].items():
        lines.append(f"memory estimate {stage} (seq {est['seq_len']} x {est['sequences']} sequence(s)): "
                     f"{est['total_gb']:.1f} GB (weights {est['weights_gb'] + est['kbit_upcast_gb']:.1f}, "
                     f"activations {est['activations_gb']:.1f}, loss head {est['loss_head_gb']:.1f}, "
                     f"optimizer {est['optimizer_gb']:.2f})")
    lines += [f"downgrade: {d}" for d in plan["downgrades"]]
    lines += [f"risk: {r}" for r in plan["risks"]]
    verdict = "feasible" if plan["feasible"] else "NOT feasible"
    lines.append(f"tier {tier}: {verdict} - {plan['feasible_reason']}")
    return lines


def run(ctx) -> dict:
    from pipeline.core import StageFailed
    cfg, rt = ctx.cfg, ctx.cfg.runtime
    if rt.rehearsal and not rt.gpu_probe_file:
        raise StageFailed("REHEARSAL=true needs GPU_PROBE_FILE=<probe.json> (configs/probes/*.json): "
                          "the plan is made from the GPU it rehearses")
    try:   # a bad probe file or DeepSpeed config is the user's to fix: one line, no traceback
        found = (hw.load_probe_file(rt.gpu_probe_file, cfg.data_path(rt.gpu_probe_file)) if rt.gpu_probe_file
                 else hw.probe())
        deepspeed = (hw.read_deepspeed_config(rt.deepspeed_config, cfg.data_path(rt.deepspeed_config))
                     if rt.deepspeed_config else None)
    except ValueError as exc:
        raise StageFailed(str(exc)) from None
    plan = hw.make_plan(found, **plan_inputs(cfg, deepspeed))
    messages = describe(found, plan, cfg.tier)
    out = {"probe": found, "plan": plan, "messages": messages}
    if rt.rehearsal:
        run_plan, differences = hw.rehearsal_plan(plan, found, optimizers={s: getattr(cfg, s).optimizer
                                                                           for s in ctx.registry.methods})
        out["run_plan"] = run_plan
        differences = differences + rt.rehearsal_changes   # the config's scaled steps, rows, rates, eval caps
        out["rehearsal"] = {"probe": rt.gpu_probe_file, "differences": differences,
                            "stand_in": f"tiny Qwen2 (random init, seed {cfg.model.tiny_seed}) in place of "
                                        f"{HUB_MODELS.get(cfg.tier, cfg.tier)}"}
        messages += [f"rehearsal: {d}" for d in differences]

    from rich.markup import escape
    for line in messages:
        style = ("yellow" if line.startswith(("downgrade", "risk", "rehearsal")) else
                 "red" if "NOT feasible" in line else "")
        ctx.console.print(f"[{style}]{escape(line)}[/]" if style else escape(line))
    return out

"""REHEARSAL=true: a GPU tier's exact configuration on the CPU with the tiny stand-in model; only the step counts
(every curriculum boundary kept), the stand-in's learning rates, the training rows and the eval samples are scaled,
and each change is recorded in runtime.rehearsal_changes.  Applied by pipeline.settings.load_config."""
from __future__ import annotations

from pipeline.sections import GPU_TIERS, _check, method_sections


def scaled_steps(tc, steps: int) -> dict:
    """A training section's step counts scaled to `steps` (never more than it had), keeping every curriculum
    boundary (each sub-stage keeps >= 1 step) and a save/eval point inside every sub-stage."""
    subs = tc.curriculum or [{"max_length": tc.max_length, "until_step": tc.max_steps}]
    total = max(min(steps, tc.max_steps), len(subs))
    bounds, last = [], 0
    for i, sub in enumerate(subs):
        left = len(subs) - i - 1
        b = max(last + 1, min(total - left, round(sub["until_step"] * total / tc.max_steps)))
        bounds.append(b)
        last = b
    first = bounds[0]
    every = max(1, min(first, round(tc.save_steps * total / tc.max_steps)))
    return {"max_steps": total, "save_steps": every, **({"eval_steps": every} if hasattr(tc, "eval_steps") else {}),
            "curriculum": [{"max_length": s["max_length"], "until_step": b} for s, b in zip(subs, bounds)]
            if tc.curriculum else []}


def rehearse(cfg, origin: dict) -> None:
    """REHEARSAL=true: the GPU tier's configuration as it is, with only step counts and eval samples scaled down."""
    where = origin.get("runtime.rehearsal", "REHEARSAL")
    _check(cfg.tier in GPU_TIERS, f"{where}: REHEARSAL=true rehearses a GPU tier, but MODEL_TIER={cfg.tier}: "
                                  f"set MODEL_TIER=7b or 14b")
    _check(bool(cfg.runtime.gpu_probe_file), f"{where}: REHEARSAL=true needs GPU_PROBE_FILE=<probe.json> "
                                             "(configs/probes/*.json): the plan is made from the GPU it rehearses")
    _check(not cfg.model.name, f"{where}: REHEARSAL=true trains a stand-in model; unset MODEL_NAME={cfg.model.name}")
    sft_steps = cfg.sft.max_steps
    from pipeline.settings import tier_file
    tiny = tier_file("tiny")
    changes = []
    for stage in method_sections():
        tc = getattr(cfg, stage)
        share = tc.max_steps / sft_steps   # the stages keep their proportions; sft gets rehearsal_steps
        before = (tc.max_steps, tc.learning_rate)
        for k, v in scaled_steps(tc, max(2, round(cfg.runtime.rehearsal_steps * min(1.0, share)))).items():
            setattr(tc, k, v)
        # the tier's rates are tuned for a pretrained 7B/14B; on the random-init stand-in they would not move the
        # loss in a few steps, so the gate's "loss went down" would be noise: the stand-in trains at its own rates
        tc.learning_rate = float(tiny.get(stage, {}).get("learning_rate",
                                                         tiny.get("methods", {}).get("learning_rate", tc.learning_rate)))
        changes.append(f"{stage}: {before[0]} -> {tc.max_steps} steps (curriculum boundaries "
                       f"{[c['until_step'] for c in tc.curriculum] or 'none'}, save every {tc.save_steps}); "
                       f"learning rate {before[1]:g} -> {tc.learning_rate:g} (the stand-in's, configs/tiers/tiny.yaml)")
    cfg.sft.eval_steps = max(cfg.sft.save_steps, cfg.sft.max_steps // 2)   # held-out eval_loss twice, not every save
    cfg.runtime.rehearsal_fraction = cfg.sft.max_steps / sft_steps
    changes.append(f"training rows scaled like the steps (x{cfg.runtime.rehearsal_fraction:.3g}): each row is seen "
                   "about as often as in the tier's run")
    n = cfg.runtime.rehearsal_eval_samples
    cfg.eval.sample_sizes = {s: min(k or n, n) for s, k in {**{s: None for s in cfg.eval.sets},
                                                           **cfg.eval.sample_sizes}.items()}
    cfg.data.sft_eval_size, cfg.data.judge_heldout_size = min(cfg.data.sft_eval_size, n), min(cfg.data.judge_heldout_size, n)
    changes.append(f"eval: at most {n} questions per set, {n} held-out SFT rows for eval_loss (twice per stage), "
                   f"{cfg.data.judge_heldout_size} judge questions")
    cfg.runtime.rehearsal_changes = changes

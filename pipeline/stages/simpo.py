"""SimPO from the SFT final (TRL CPOTrainer, loss_type="simpo", cpo_alpha=0).  Run: python -m pipeline run simpo

Writes checkpoints/simpo-real-baseline/final and reports/training/simpo_metrics.json.
"""
from pipeline import training as T


def run(ctx) -> dict:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    return T.train_preference(ctx, "simpo", CPOConfig, CPOTrainer, paired=True, extra_args={
        "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": ctx.cfg.simpo.simpo_gamma,
        "remove_unused_columns": False})

"""DPO from the SFT final (TRL DPOTrainer).  Run: python -m pipeline run dpo

Writes checkpoints/dpo-real-baseline/final and reports/training/dpo_metrics.json.
"""
from pipeline import training as T


def run(ctx) -> dict:
    from trl import DPOConfig, DPOTrainer
    return T.train_preference(ctx, "dpo", DPOConfig, DPOTrainer, paired=True, extra_args={})

"""DPO from the SFT final (TRL DPOTrainer).  Run: python -m pipeline run dpo

Writes checkpoints/dpo-real-baseline/final and reports/training/dpo_metrics.json.
"""
from pipeline import training as T
from pipeline import data as D
from pipeline.core import Method, Stage
from pipeline.training_checks import checks

STAGE = Stage("dpo", "reports/training/dpo_metrics.json", needs=("sft",), reads=T.reads("dpo", "beta"), untracked=T.UNTRACKED,
              inputs=D.files("preference_path"), training=True,
              method=Method("checkpoints/dpo-real-baseline", sequences_per_example=2, trainer="DPOTrainer"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    from trl import DPOConfig, DPOTrainer
    return T.train_preference(ctx, "dpo", DPOConfig, DPOTrainer, paired=True, extra_args={})

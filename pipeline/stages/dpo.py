"""DPO from the SFT final (TRL DPOTrainer).  Run: python -m pipeline run dpo

Writes checkpoints/dpo-real-baseline/final and reports/training/dpo_metrics.json.
"""
from pipeline import data as D
from pipeline import training as T
from pipeline.core import Method, Stage
from pipeline.sections import PreferenceCfg
from pipeline.training_checks import checks

# chosen + rejected go through the model as one batch; QLoRA trainables cast to bf16 (trl/trainer/dpo_trainer.py:726-729)
STAGE = Stage("dpo", "reports/training/dpo_metrics.json", config=PreferenceCfg,
              needs=("sft",), training=True,
              distributed=True, prepare=T.prepare,
              reads=T.reads("dpo", "beta"), untracked=T.UNTRACKED,
              advice=T.ADVICE, inputs=D.files("preference_path"),
              method=Method("checkpoints/dpo-real-baseline", sequences_per_example=2, trainer="DPOTrainer"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def trainer(cfg):
    from trl import DPOConfig, DPOTrainer
    return DPOConfig, DPOTrainer, True, {}


def run(ctx) -> dict:
    return T.train_preference(ctx, "dpo", *trainer(ctx.cfg))

"""ORPO from the SFT final (TRL's experimental ORPOTrainer; reference-free, like SimPO; `beta` is ORPO's lambda, the
weight of the odds-ratio term beside the NLL of the chosen answer).  Run: python -m pipeline run orpo

Writes checkpoints/orpo-real-baseline/final and reports/training/orpo_metrics.json.
"""
from pipeline import data as D
from pipeline import training as T
from pipeline.core import Method, Stage
from pipeline.sections import PreferenceCfg

# chosen + rejected in one batch; it takes outputs.logits (trl/experimental/orpo/orpo_trainer.py:777) and, given a
# PeftModel without a peft_config, leaves the adapters' dtype alone (orpo_trainer.py:202-265)
STAGE = Stage("orpo", "reports/training/orpo_metrics.json", config=PreferenceCfg,
              needs=("sft",), training=True,
              distributed=True, prepare=T.prepare,
              reads=T.reads("orpo", "beta"), untracked=T.UNTRACKED,
              advice=T.ADVICE, inputs=D.files("preference_path"),
              method=Method("checkpoints/orpo-real-baseline", sequences_per_example=2, full_logits=True,
                            casts_adapters_bf16=False, trainer="ORPOTrainer", reference="none"))


def trainer(cfg):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer, True, {"remove_unused_columns": False}


def run(ctx) -> dict:
    return T.train_preference(ctx, "orpo", *trainer(ctx.cfg))

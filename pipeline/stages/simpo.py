"""SimPO from the SFT final (TRL CPOTrainer, loss_type="simpo", cpo_alpha=0).  Run: python -m pipeline run simpo

Writes checkpoints/simpo-real-baseline/final and reports/training/simpo_metrics.json.
"""
from pipeline import data as D
from pipeline import training as T
from pipeline.core import Method, Stage
from pipeline.sections import SimPOCfg
from pipeline.training_checks import checks

# CPOTrainer takes outputs.logits (trl/experimental/cpo/cpo_trainer.py:824) and keeps a PeftModel's fp32 adapters
STAGE = Stage("simpo", "reports/training/simpo_metrics.json", config=SimPOCfg,
              needs=("sft",), training=True,
              distributed=True, prepare=T.prepare,
              reads=T.reads("simpo", "beta", "simpo_gamma"), untracked=T.UNTRACKED,
              advice=T.ADVICE, inputs=D.files("preference_path"),
              method=Method("checkpoints/simpo-real-baseline", sequences_per_example=2, full_logits=True,
                            casts_adapters_bf16=False, trainer="CPOTrainer (loss_type=simpo, cpo_alpha=0)",
                            reference="none"))


def trainer(cfg):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    return CPOConfig, CPOTrainer, True, {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.simpo.simpo_gamma,
                                         "remove_unused_columns": False}

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    return T.train_preference(ctx, "simpo", *trainer(ctx.cfg))

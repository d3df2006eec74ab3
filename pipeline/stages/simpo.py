"""SimPO from the SFT final (TRL CPOTrainer, loss_type="simpo", cpo_alpha=0).  Run: python -m pipeline run simpo

Writes checkpoints/simpo-real-baseline/final and reports/training/simpo_metrics.json.
"""
from pipeline import training as T
from pipeline import data as D
from pipeline.core import Method, Stage
from pipeline.training_checks import checks

STAGE = Stage("simpo", "reports/training/simpo_metrics.json", needs=("sft",), reads=T.reads("simpo", "beta", "simpo_gamma"),
              untracked=T.UNTRACKED,
              inputs=D.files("preference_path"), training=True,
              method=Method("checkpoints/simpo-real-baseline", sequences_per_example=2, full_logits=True,
                            trainer="CPOTrainer (loss_type=simpo, cpo_alpha=0)", reference="none"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    return T.train_preference(ctx, "simpo", CPOConfig, CPOTrainer, paired=True, extra_args={
        "loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": ctx.cfg.simpo.simpo_gamma,
        "remove_unused_columns": False})

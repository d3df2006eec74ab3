"""KTO from the SFT final (TRL KTOTrainer; pairs unpaired unless data.kto_path is set).  Run: python -m pipeline run kto

Writes checkpoints/kto-real-baseline/final and reports/training/kto_metrics.json.
"""
from pipeline import training as T
from pipeline import data as D
from pipeline.core import Method, Stage
from pipeline.training_checks import checks

STAGE = Stage("kto", "reports/training/kto_metrics.json", needs=("sft",), untracked=T.UNTRACKED,
              reads=T.reads("kto", "beta", data=T.PREFERENCE_DATA + ("data.kto_path",)),
              inputs=D.files("preference_path", "kto_path"), training=True,
              method=Method("checkpoints/kto-real-baseline", min_batch=2, trainer="KTOTrainer"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    from trl import KTOConfig, KTOTrainer
    return T.train_preference(ctx, "kto", KTOConfig, KTOTrainer, paired=False, extra_args={})

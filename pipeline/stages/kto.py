"""KTO from the SFT final (TRL KTOTrainer; pairs unpaired unless data.kto_path is set).  Run: python -m pipeline run kto

Writes checkpoints/kto-real-baseline/final and reports/training/kto_metrics.json.
"""
from pipeline import data as D
from pipeline import training as T
from pipeline.core import Method, Stage
from pipeline.sections import PreferenceCfg
from pipeline.training_checks import checks

# KTOTrainer refuses a per-device batch of 1 (trl/trainer/kto_trainer.py:844-847); its KL completions run under
# no_grad (kto_trainer.py:1364); QLoRA trainables cast to bf16 (kto_trainer.py:777-780)
STAGE = Stage("kto", "reports/training/kto_metrics.json", config=PreferenceCfg,
              needs=("sft",), training=True,
              distributed=True, prepare=T.prepare,
              reads=T.reads("kto", "beta", data=T.PREFERENCE_DATA + ("data.kto_path",)), untracked=T.UNTRACKED,
              advice=T.ADVICE, inputs=D.files("preference_path", "kto_path"),
              method=Method("checkpoints/kto-real-baseline", min_batch=2, trainer="KTOTrainer"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def trainer(cfg):
    from trl import KTOConfig, KTOTrainer
    return KTOConfig, KTOTrainer, False, {}


def run(ctx) -> dict:
    return T.train_preference(ctx, "kto", *trainer(ctx.cfg))

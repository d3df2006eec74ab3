"""SFT with LoRA/QLoRA (TRL SFTTrainer), curriculum and auto-resume.  Run: python -m pipeline run sft

Writes checkpoints/layer_b/<slug>_sft/final and reports/training/layer_b_<slug>_sft_metrics.json.
"""
from __future__ import annotations

from pipeline import data as D
from pipeline import models
from pipeline import training as T
from pipeline.core import Method, Stage
from pipeline.sections import SFTCfg
from pipeline.training_checks import checks

# QLoRA trainables cast to bf16 (trl/trainer/sft_trainer.py:908-911)
STAGE = Stage("sft", "reports/training/layer_b_{slug}_sft_metrics.json", config=SFTCfg,
              needs=("gpu_check",), training=True,
              distributed=True, prepare=T.prepare,
              reads=T.reads("sft", "eval_steps", "packing", data=T.SFT_DATA)
              + ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"),
              untracked=T.UNTRACKED, advice=T.ADVICE, inputs=D.files("sft_path"), content=models.base_content,
              method=Method("checkpoints/layer_b/{slug}_sft", start="base", trainer="SFTTrainer", reference="none"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    T.gate(ctx)                                        # skip with evidence before anything is downloaded
    from datasets import Dataset

    from pipeline import models
    cfg, plan = ctx.cfg, ctx.plan

    # --- data: judge and eval held out by id, the rest trains ----------------------------------------
    split = T.sft_splits(cfg)
    train = Dataset.from_list([{"messages": r["messages"]} for r in split["train"]])
    held = Dataset.from_list([{"messages": r["messages"]} for r in split["eval"]])

    # --- model and tokenizer, as the hardware plan says ----------------------------------------------
    base = models.base_for(cfg)
    tok, template_note = T.sft_tokenizer(base)

    def build(max_length: int, args: dict):   # the preflight measures the same trainer (T.trainer_for)
        return T.trainer_for(cfg, "sft", plan, base, tok, {"train": train, "eval": held}, max_length, args)

    # --- train: curriculum sub-stages, resume, OOM retry ---------------------------------------------
    res = T.fit(ctx, "sft", build)
    tok.save_pretrained(res["final"])                   # the template the adapter was trained with
    return T.training_evidence(ctx, "sft", res, base, {
        "base_model_identity": models.base_model_identity(base),
        "chat_template": {"sha256": models.chat_template_sha256(tok), "source": template_note},
        "data": {"train_rows": len(split["train"]), "eval_ids": [r["id"] for r in split["eval"]],
                 "judge_heldout_ids": [r["id"] for r in split["judge"]], "source": split["report"]},
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                 "target_modules": cfg.lora.target_modules},
    })

"""SFT with LoRA/QLoRA (TRL SFTTrainer), curriculum and auto-resume.  Run: python -m pipeline run sft

Writes checkpoints/layer_b/<slug>_sft/final and reports/training/layer_b_<slug>_sft_metrics.json.
"""
from __future__ import annotations

from pipeline import data as D
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
              untracked=T.UNTRACKED, inputs=D.files("sft_path"),
              method=Method("checkpoints/layer_b/{slug}_sft", start="base", trainer="SFTTrainer", reference="none"))

__all__ = ["STAGE", "run", "checks"]   # checks: the gate's, one set shared by every training method


def run(ctx) -> dict:
    T.gate(ctx)                                        # skip with evidence before anything is downloaded
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    from pipeline import models
    cfg, plan = ctx.cfg, ctx.plan

    # --- data: judge and eval held out by id, the rest trains ----------------------------------------
    split = T.sft_splits(cfg)
    train = Dataset.from_list([{"messages": r["messages"]} for r in split["train"]])
    held = Dataset.from_list([{"messages": r["messages"]} for r in split["eval"]])

    # --- model and tokenizer, as the hardware plan says ----------------------------------------------
    base = models.base_for(cfg)
    tok = models.load_tokenizer(base)
    template_note = "own template has {% generation %} markers"
    if not models.has_generation_markers(tok):
        patched = get_training_chat_template(tok)
        if patched is None:
            raise T.StageFailed(f"the chat template of {base} has no {{% generation %}} markers and TRL has no "
                                "training template for it: assistant-only loss is impossible; use a model TRL supports")
        tok.chat_template, template_note = patched, "TRL training template (adds {% generation %} markers)"
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")

    def build(max_length: int, args: dict):
        sargs = T.trl_config(SFTConfig, "sft", cfg.sft, **args, max_length=max_length, assistant_only_loss=True,
                             packing=cfg.sft.packing, eval_strategy="steps", eval_steps=cfg.sft.eval_steps,
                             per_device_eval_batch_size=args["per_device_train_batch_size"], dataset_num_proc=None)
        model = models.load_model(base, plan, trainable=True, activation_checkpointing=cfg.sft.activation_checkpointing)
        return SFTTrainer(model=model, args=sargs, train_dataset=train, eval_dataset=held,
                          processing_class=tok, peft_config=lora)

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

"""The arguments a training stage gives TRL: one TrainingArguments schedule per stage (base_args), the precision
and optimizer the plan allows, the names the installed transformers speaks, and `<method>.trl` passed verbatim
(trl_config). pipeline.training re-exports these names.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core import StageFailed


def precision_args(plan: dict) -> dict:
    on_cpu = plan["device"] == "cpu"
    return {"use_cpu": on_cpu, "bf16": plan["precision"] == "bf16", "fp16": plan["precision"] == "fp16"}


def optimizer_for(tc, plan: dict) -> tuple[str, str | None]:
    """The optimizer that runs here, and why it differs from the config's (8-bit/paged ones need CUDA)."""
    if plan["device"] == "cuda" or "8bit" not in tc.optimizer:
        return tc.optimizer, None
    return "adamw_torch", f"optimizer {tc.optimizer} needs CUDA (bitsandbytes paged/8-bit states): adamw_torch here"


def for_installed_transformers(args: dict, arguments_class=None) -> dict:
    """transformers before the activation_checkpointing rename (5.17, on some GPU images) knows only the
    gradient_checkpointing names; 5.24 mirrors the old names onto the new (transformers/training_args.py:1533-1545)."""
    import dataclasses
    if arguments_class is None:
        from transformers import TrainingArguments as arguments_class
    known = {f.name for f in dataclasses.fields(arguments_class)}
    out = dict(args)
    for new, old in (("activation_checkpointing", "gradient_checkpointing"),
                     ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")):
        if new in out and new not in known:
            out[old] = out.pop(new)
    return out


def base_args(cfg, kind: str, plan: dict, out: Path, batch: int, grad_acc: int) -> dict:
    """TrainingArguments for the whole stage: ONE schedule over max_steps (sub-stages stop early, see StopAt)."""
    tc = getattr(cfg, kind)
    return for_installed_transformers(dict(output_dir=str(out), max_steps=tc.max_steps, learning_rate=tc.learning_rate,
                per_device_train_batch_size=batch, gradient_accumulation_steps=grad_acc,
                warmup_steps=tc.warmup_ratio, logging_steps=tc.logging_steps, save_strategy="steps",
                save_steps=tc.save_steps, save_total_limit=tc.save_total_limit, optim=optimizer_for(tc, plan)[0],
                activation_checkpointing=tc.activation_checkpointing,   # gradient_checkpointing mirrors it
                # non-reentrant: reentrant checkpointing + DDP over a PeftModel fails; every LoRA param gets a grad
                activation_checkpointing_kwargs={"use_reentrant": False}, ddp_find_unused_parameters=False,
                seed=cfg.runtime.seed, data_seed=cfg.runtime.seed,
                report_to=cfg.runtime.report_to,
                deepspeed=str(cfg.data_path(cfg.runtime.deepspeed_config))   # the plan refuses ZeRO-3
                if cfg.runtime.deepspeed_config and not plan.get("rehearsal") else None,
                dataloader_num_workers=0,
                include_num_input_tokens_seen="all", disable_tqdm=False, **precision_args(plan)))


def trl_config(config_cls, kind: str, tc, **ours):
    """The TRL config: our arguments plus `<kind>.trl` verbatim (TRL's config class validates their values); a key
    the class does not know, or one the pipeline sets from its own keys, is a one-line error naming it."""
    import dataclasses
    extra = dict(tc.trl)
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise StageFailed(f"{kind}.trl: {config_cls.__name__} has no field {', '.join(unknown)}: use its field names "
                          f"(TRL's {config_cls.__name__} docs) or remove them from {kind}.trl")
    clash = sorted(set(extra) & set(ours))
    if clash:
        raise StageFailed(f"{kind}.trl sets {', '.join(clash)}, which the pipeline sets from its {kind}.* keys "
                          f"(batch_size, grad_acc, max_length, ...): set them there, not under {kind}.trl")
    try:
        return config_cls(**ours, **extra)
    except (TypeError, ValueError) as exc:
        raise StageFailed(f"{kind}.trl: {config_cls.__name__} refused the values: {exc}") from None

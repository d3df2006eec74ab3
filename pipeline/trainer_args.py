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


# --- the trainer itself: one builder for the stage (training.fit) and the preflight ---------------------------
def module_widths(model_config: dict) -> dict[str, int]:
    """The smaller dimension (in, out) of each linear LoRA can target in a Llama/Qwen2-style decoder, from its
    config.json: a rank above it adds parameters and no capacity (the update's rank is capped by it)."""
    c = model_config
    hidden, inter = c.get("hidden_size"), c.get("intermediate_size")
    heads = c.get("num_attention_heads")
    head_dim = c.get("head_dim") or (hidden // heads if hidden and heads else None)
    kv = (c.get("num_key_value_heads") or heads or 0) * (head_dim or 0) or None
    q = (heads or 0) * (head_dim or 0) or None
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return {name: min(d) for name, d in dims.items() if all(isinstance(x, int) and x > 0 for x in d)}


def lora_rank_problem(cfg, model_config: dict, model: str) -> str | None:
    """One line when lora.r exceeds the width of a module it targets (None when it fits or is unknown)."""
    widths = module_widths(model_config)
    targets = cfg.lora.target_modules
    names = list(widths) if targets in ("all-linear", ["all-linear"]) else [t for t in targets if t in widths]
    narrow = sorted((widths[n], n) for n in names)
    if narrow and cfg.lora.r > narrow[0][0]:
        width, name = narrow[0]
        return (f"lora.r={cfg.lora.r} exceeds the width of {name} ({width}) in {model}: a LoRA update cannot have "
                f"a rank above its module's smaller dimension; set lora.r <= {width} (configs/base.yaml `lora.r`, "
                "or the argument lora.r=...), or drop the narrow module from lora.target_modules")
    return None


def _config_json(base: str) -> dict | None:
    """The base's config.json (a local folder or the hub cache), or None."""
    import json
    path = Path(base) / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache
        try:
            found = try_to_load_from_cache(base, "config.json")
        except ValueError:
            return None
        path = Path(found) if isinstance(found, str) else None
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError):
        return None


def lora_config(cfg, model_config: dict | None = None, model: str = "the base model"):
    from peft import LoraConfig
    if model_config is not None and (problem := lora_rank_problem(cfg, model_config, model)):
        raise StageFailed(problem)
    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def sft_tokenizer(base: str):
    """The base's tokenizer with a chat template that has {% generation %} markers (assistant-only loss), and
    where that template came from."""
    from trl.chat_template_utils import get_training_chat_template
    from pipeline import models
    tok = models.load_tokenizer(base)
    if models.has_generation_markers(tok):
        return tok, "own template has {% generation %} markers"
    patched = get_training_chat_template(tok)
    if patched is None:
        raise StageFailed(f"the chat template of {base} has no {{% generation %}} markers and TRL has no "
                          "training template for it: assistant-only loss is impossible; use a model TRL supports")
    tok.chat_template = patched
    return tok, "TRL training template (adds {% generation %} markers)"


def trainer_for(cfg, kind: str, plan: dict, base: str, tok, data: dict, max_length: int, args: dict,
                adapter: str | None = None, classes: tuple | None = None, base_model=None):
    """The TRL trainer of method `kind`, as its stage trains it and as the preflight measures it: SFT puts a fresh
    LoRA on the base (data: train and eval); a method trained from SFT continues `adapter` (data: train) with the
    classes and arguments its stage module's trainer(cfg) names (or `classes`, the ones its run() handed over).
    `base_model`: the base `base` already loaded (trainable), used instead of loading it (the preflight's one load;
    models.without_adapters gives it back clean)."""
    from pipeline import models
    from pipeline.stages import REGISTRY   # at call time: the stage modules import this module
    tc, stage = getattr(cfg, kind), REGISTRY[kind]

    def load():
        if base_model is not None:
            return models.with_adapter(base_model, base, adapter, True) if adapter else base_model
        return models.load_model(base, plan, adapter=adapter, trainable=True,
                                 activation_checkpointing=tc.activation_checkpointing)
    if stage.method.start == "base":
        from trl import SFTConfig, SFTTrainer
        sargs = trl_config(SFTConfig, kind, tc, **args, max_length=max_length, assistant_only_loss=True,
                           packing=tc.packing, eval_strategy="steps", eval_steps=tc.eval_steps,
                           per_device_eval_batch_size=args["per_device_train_batch_size"], dataset_num_proc=None)
        peft_config = lora_config(cfg, _config_json(base), base)   # before the model loads
        return SFTTrainer(model=load(), args=sargs, train_dataset=data["train"], eval_dataset=data["eval"],
                          processing_class=tok, peft_config=peft_config)
    config_cls, trainer_cls, _, extra = classes or stage.trainer(cfg)   # classes: what the stage's run() passed
    targs = trl_config(config_cls, kind, tc, **args, max_length=max_length, beta=tc.beta, **extra)
    return trainer_cls(model=load(), args=targs, train_dataset=data["train"], processing_class=tok)

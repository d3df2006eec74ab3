"""The five variants that eval, judge and the gate compare: the base model and four LoRA finals.

Each trained variant's final is ONE LoRA adapter over the base model (DPO/SimPO/KTO continued training
the SFT adapter), loaded only after its folder re-hashes to the checkpoint_files its metrics recorded.
Heavy imports (torch, transformers, peft) stay inside the functions.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import evidence as ev
from pipeline.engine import StageFailed

VARIANTS = ("base", "sft", "dpo", "simpo", "kto")
TRAINED = VARIANTS[1:]
ALIGNED = ("dpo", "simpo", "kto")


def _entry(status: str, reason: str | None = None, checkpoint_dir=None, checkpoint_sha256=None) -> dict:
    return {"status": status, "reason": reason, "checkpoint_dir": checkpoint_dir, "checkpoint_sha256": checkpoint_sha256}


def variant_table(ctx) -> dict:
    """{variant: {"status": "scored" | "skipped", "reason", "checkpoint_dir", "checkpoint_sha256"}}."""
    plan = ctx.plan
    if plan.get("feasible"):
        table = {"base": _entry("scored")}
    else:
        table = {"base": _entry("skipped", f"hardware plan: {plan.get('feasible_reason', 'not feasible')}")}
    for name in TRAINED:
        doc = ctx.evidence(name)
        if not isinstance(doc, dict):
            table[name] = _entry("skipped", f"no {name} metrics: run `python -m pipeline run {name}`")
        elif doc.get("status") != "ok" or not doc.get("checkpoint_dir"):
            table[name] = _entry("skipped", f"{name} training {doc.get('status')}: {doc.get('reason') or 'no final checkpoint'}")
        else:
            table[name] = _entry("scored", None, doc["checkpoint_dir"], doc.get("checkpoint_sha256"))
    return table


def base_model_path(ctx) -> str:
    from pipeline import models
    cfg = ctx.cfg
    return models.resolve_base_model(cfg.tier, cfg.model.name, cfg.cache_dir, seed=cfg.model.tiny_seed)[0]


def verified_adapter(ctx, name: str) -> Path:
    """The variant's final folder, after checking it re-hashes to its metrics' checkpoint_files."""
    doc = ctx.evidence(name) or {}
    if doc.get("status") != "ok":
        raise StageFailed(f"variant {name} has no ok training metrics (status {doc.get('status')!r}): "
                          f"run `python -m pipeline run {name}`")
    folder = ctx.root / doc["checkpoint_dir"]
    if not folder.is_dir():
        raise StageFailed(f"the {name} final {doc['checkpoint_dir']} is missing: re-run `python -m pipeline run {name} --force`")
    now, recorded = ev.sha256_tree(folder), doc.get("checkpoint_files") or {}
    if now != recorded:
        changed = sorted(set(now.items()) ^ set(recorded.items()))
        raise StageFailed(f"the {name} final {doc['checkpoint_dir']} does not match the hashes in its metrics "
                          f"(first difference: {changed[0][0] if changed else '?'}): refusing to load it; "
                          f"re-run `python -m pipeline run {name} --force`")
    return folder


def load_variant(ctx, name: str, padding_side: str = "left", plan: dict | None = None):
    """(model, tokenizer) of a variant: base alone, or base + the variant's verified final adapter.

    The tokenizer of a trained variant comes from its adapter folder (the chat template it was trained
    with); the base's from the base model. `plan` defaults to the hardware plan (ctx.plan)."""
    from pipeline import models
    if name not in VARIANTS:
        raise ValueError(f"load_variant: unknown variant {name!r}; use one of {', '.join(VARIANTS)}")
    plan = plan or ctx.plan
    base = base_model_path(ctx)
    if name == "base":
        return models.load_model(base, plan), models.load_tokenizer(base, padding_side=padding_side)
    adapter = verified_adapter(ctx, name)
    has_tok = (adapter / "tokenizer_config.json").is_file()
    tok = models.load_tokenizer(adapter if has_tok else base, padding_side=padding_side)
    return models.load_model(base, plan, adapter=str(adapter)), tok


def free() -> None:
    """After `del model` in the caller: collect it and give its GPU memory back before the next variant loads."""
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(model, tok, prompts: list[list[dict]], batch_size: int, max_new_tokens: int,
             progress=None, description: str = "generating") -> list[str]:
    """Greedy answers to chat prompts (lists of messages), batched with left padding, in input order.

    Prompts are batched by rendered length (less padding); `progress(iterable, total=, description=)`
    wraps the batch loop (ctx.progress)."""
    import torch
    if tok.padding_side != "left":
        raise ValueError("generate: the tokenizer pads on the right; load it with padding_side='left'")
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tok.eos_token_id})
    out: list[str | None] = [None] * len(texts)
    loop = progress(starts, total=len(starts), description=description) if progress else starts
    for start in loop:
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        new = seqs[:, enc["input_ids"].shape[1]:]
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
    return out

"""The five variants that eval, judge and the gate compare: the base model and four LoRA finals.

Each trained variant's final is ONE LoRA adapter over the base model (DPO/SimPO/KTO continued training
the SFT adapter), loaded only after its folder re-hashes to the checkpoint_files its metrics recorded.
Heavy imports (torch, transformers, peft) stay inside the functions.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from pipeline import evidence as ev
from pipeline.core import StageFailed

def _entry(status: str, reason: str | None = None, checkpoint_dir=None, checkpoint_sha256=None) -> dict:
    return {"status": status, "reason": reason, "checkpoint_dir": checkpoint_dir, "checkpoint_sha256": checkpoint_sha256}


def variant_table(ctx) -> dict:
    """{variant: {"status": "scored" | "skipped", "reason", "checkpoint_dir", "checkpoint_sha256"}}."""
    plan = ctx.plan
    if plan.get("feasible"):
        table = {"base": _entry("scored")}
    else:
        table = {"base": _entry("skipped", f"hardware plan: {plan.get('feasible_reason', 'not feasible')}")}
    for name in ctx.registry.methods:
        doc = ctx.evidence(name)
        if not isinstance(doc, dict):
            table[name] = _entry("skipped", f"no {name} metrics: run `python -m pipeline run {name}`")
        elif doc.get("status") != "ok" or not doc.get("checkpoint_dir"):
            table[name] = _entry("skipped", f"{name} training {doc.get('status')}: {doc.get('reason') or 'no final checkpoint'}")
        else:
            table[name] = _entry("scored", None, doc["checkpoint_dir"], doc.get("checkpoint_sha256"))
    return table


def base_model_path(ctx) -> str:
    """The base model every variant runs on (in a rehearsal, the stand-in), built first where it is local."""
    from pipeline import models
    return models.base_for(ctx.cfg)


def verified_adapter(ctx, name: str) -> Path:
    """The variant's final folder, after checking it re-hashes to its metrics' checkpoint_files."""
    doc = ctx.evidence(name) or {}
    if doc.get("status") != "ok":
        raise StageFailed(f"variant {name} has no ok training metrics (status {doc.get('status')!r}): "
                          f"run `python -m pipeline run {name}`")
    folder = ctx.root / doc["checkpoint_dir"]
    if not folder.is_dir():
        raise StageFailed(f"the {name} final {doc['checkpoint_dir']} is missing: re-run `python -m pipeline run {name} --force`")
    _, diff = ev.verify_tree(folder, doc.get("checkpoint_files"))
    if diff:
        kind, paths = next(iter(diff.items()))
        raise StageFailed(f"the {name} final {doc['checkpoint_dir']} does not match the hashes in its metrics "
                          f"(first difference: {paths[0]}, {kind}): refusing to load it; "
                          f"re-run `python -m pipeline run {name} --force`")
    return folder


class Variants:
    """The variants on ONE base model per process: each trained variant is an adapter switched on it.

        with Variants(ctx) as vs:                  # eval, judge; the gate: Variants(None, plan) and vs.load(...)
            for name in ("base", "sft", "dpo"):
                model, tok = vs.use(name)           # valid until the next use()/load() or the end of the block
                texts = generate(model, tok, ...)

    The base loads on the first use (nothing loads when nothing is used). A trained variant's final is verified
    by hash, loaded next to the adapter in use (PeftModel.from_pretrained, then load_adapter: peft/peft_model.py
    :418, :1417), made active (set_adapter, :1607) and the previous adapter deleted (delete_adapter, :1166); the
    base variant runs inside `disable_adapter()` (:1023) once an adapter is on the model. Another base path (the
    gate probing a full model folder) releases this one first. Entering resets models.live_high_water, so
    memory() says what this block held. A trained variant's tokenizer comes from its adapter folder (the chat
    template it was trained with)."""

    def __init__(self, ctx, plan: dict | None = None, padding_side: str = "left"):
        self.ctx, self.padding_side = ctx, padding_side
        self.plan = plan if plan is not None else ctx.plan
        self.base_loads = 0
        self._model = self._base = self._adapter = None
        self._disabled = contextlib.ExitStack()   # the base variant's disable_adapter(), left at the next switch

    def __enter__(self) -> "Variants":
        from pipeline import models
        models.release()
        models.live_high_water(reset=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory(self) -> dict:
        from pipeline import models
        return {"max_live_models": models.live_high_water(), "base_loads": self.base_loads}

    def use(self, name: str):
        """(model, tokenizer) of a variant: the base alone, or the base + the variant's verified final adapter."""
        if name not in self.ctx.registry.variants:
            raise ValueError(f"Variants.use: unknown variant {name!r}; use one of {', '.join(self.ctx.registry.variants)}")
        adapter = None if name == "base" else verified_adapter(self.ctx, name)
        return self.load(base_model_path(self.ctx), adapter, name)

    def load(self, base, adapter=None, name: str = "adapter"):
        """(model, tokenizer): the adapter folder (verified by the caller) on `base`, or `base` alone."""
        from pipeline import models
        self._disabled.close()
        if self._base != str(base):
            self.close()
            self._model, self._base = models.load_model(base, self.plan), str(base)
            self.base_loads += 1
        has_tok = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
        tok = models.load_tokenizer(adapter if has_tok else base, padding_side=self.padding_side)
        if adapter is None:
            if self._adapter is not None:
                self._disabled.enter_context(self._model.disable_adapter())
            return self._model, tok
        try:
            self._switch(str(adapter), name)
        except BaseException:
            self.close()   # a half-loaded adapter: the next load starts from a fresh base
            raise
        return self._model, tok

    def _switch(self, adapter: str, name: str) -> None:
        from peft import PeftModel
        old = self._adapter
        new = name if name != old else f"{name}_"   # a reload of the adapter in use gets a free name
        if old is None:
            self._model = PeftModel.from_pretrained(self._model, adapter, adapter_name=new, is_trainable=False)
        else:
            self._model.load_adapter(adapter, adapter_name=new, is_trainable=False)
            self._model.set_adapter(new, inference_mode=True)   # else it turns requires_grad on (tuners_utils:2048)
            self._model.delete_adapter(old)
        self._model.eval()
        self._adapter = new

    def close(self) -> None:
        """Drop the model (the caller drops its own references) and give its memory back."""
        from pipeline import models
        self._disabled.close()
        self._model = self._base = self._adapter = None
        models.release()


def decoding(max_new_tokens: int) -> dict:
    """Greedy decoding with every setting explicit, so a model's generation_config.json (Qwen2.5's sets
    repetition_penalty 1.05, do_sample, temperature, top_p, top_k) changes nothing. transformers fills only
    the settings left None from the model's config (generation/utils.py:2113-2115); the sampling warpers that
    temperature/top_p/top_k feed run only when do_sample is true (utils.py:1603); repetition_penalty 1.0,
    no_repeat_ngram_size 0 and min_new_tokens 0 add no processor (utils.py:1472, 1488, 1533-1536)."""
    return {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
            "min_new_tokens": 0, "max_new_tokens": max_new_tokens,
            "temperature": None, "top_p": None, "top_k": None}


def generation_config(model, tok, max_new_tokens: int, **extra):
    """The explicit transformers.GenerationConfig for `decoding`; stops at the model's and the tokenizer's eos."""
    from transformers import GenerationConfig
    eos = model.generation_config.eos_token_id
    eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []), tok.eos_token_id})
    return GenerationConfig(**decoding(max_new_tokens), eos_token_id=eos, pad_token_id=tok.pad_token_id, **extra)


def generate(model, tok, prompts: list[list[dict]], batch_size: int, max_new_tokens: int,
             progress=None, description: str = "generating", token_ids: list | None = None,
             streamer=None) -> list[str]:
    """Greedy answers (`decoding`) to chat prompts (lists of messages), batched with left padding, in input order.

    Prompts are batched by rendered length (less padding); `progress(iterable, total=, description=)`
    wraps the batch loop (ctx.progress). A `token_ids` list receives each answer's generated token ids. A
    transformers streamer (TextStreamer: batch_size 1) receives the tokens as they come (pipeline/chat.py)."""
    import torch
    if tok.padding_side != "left":
        raise ValueError("generate: the tokenizer pads on the right; load it with padding_side='left'")
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    starts = range(0, len(order), batch_size)
    config = generation_config(model, tok, max_new_tokens)
    out: list[str | None] = [None] * len(texts)
    ids: list[list[int] | None] = [None] * len(texts)
    loop = progress(starts, total=len(starts), description=description) if progress else starts
    for start in loop:
        idx = order[start:start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            seqs = model.generate(**enc, generation_config=config, streamer=streamer)
        new = seqs[:, enc["input_ids"].shape[1]:]
        for i, text, row in zip(idx, tok.batch_decode(new, skip_special_tokens=True), new.tolist()):
            out[i], ids[i] = text.strip(), row
    if token_ids is not None:
        token_ids.extend(ids)
    return out

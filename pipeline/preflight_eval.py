"""The preflight's eval and judge measurements (pipeline/stages/preflight.py calls them on the base it loaded once).

eval: one generation batch per eval set (the seeded sample eval answers, at eval.batch_size and
eval.max_new_tokens), extrapolated to the set's questions x the variants, plus the base load.
judge: when a judge is enabled, the variants' answers to the judge questions (one measured batch at
judge.max_new_tokens) plus the planned requests in waves of judge.concurrency at the latency of one request
measured against the configured endpoint; 0 with the reason when the judges are off or have no key.
The eval and judge stages' own functions build the prompts (read, not changed).
"""
from __future__ import annotations

import time

from pipeline import models
from pipeline import preflight_kit as K
from pipeline import training as T


def _ready_to_generate(model) -> None:
    """A trainer may have turned activation checkpointing (and with it the KV cache) off: generation wants both back."""
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    model.config.use_cache = True


def timed_batch(model, tok, prompts: list, batch_size: int, max_new_tokens: int) -> tuple[float, list[str]]:
    """Seconds one generation batch of `prompts` (at most batch_size of them) takes, and its answers."""
    from pipeline.variants import generate
    t0 = time.monotonic()
    texts = generate(model, tok, prompts[:batch_size], batch_size, max_new_tokens)
    return round(time.monotonic() - t0, 3), texts


def eval_prediction(ctx, base: str, model, load_s: float) -> dict:
    from pipeline.stages.eval import load_sets, messages
    cfg = ctx.cfg
    _ready_to_generate(model)
    tok = models.load_tokenizer(base, padding_side="left")
    per_set = {}
    for name, (rows, _full) in load_sets(cfg).items():
        if rows:
            secs, _ = timed_batch(model, tok, [messages(r) for r in rows], cfg.eval.batch_size, cfg.eval.max_new_tokens)
            per_set[name] = {"questions": len(rows), "batch": min(cfg.eval.batch_size, len(rows)), "batch_s": secs}
    out = K.predict_generation(load_s, per_set, len(ctx.registry.variants))
    return {**out, "sets": per_set, "max_new_tokens": cfg.eval.max_new_tokens,
            "basis": "one measured generation batch per set (the first of eval's seeded sample) x the set's batches "
                     "x the variants, plus the base load; the LLM answer-extraction fallback is not included"}


def judge_prediction(ctx, base: str, model) -> dict:
    from pipeline.stages.judge import DEFAULT_BASE_URL, FLAGS, prompt_of
    cfg, jc, reg = ctx.cfg, ctx.cfg.judge, ctx.registry
    on = [k for k, (attr, _) in FLAGS.items() if getattr(jc, attr)]
    if not on:
        return {"predicted_s": 0.0, "requests": 0,
                "basis": "judges off (ENABLE_LLM_JUDGE=false, ENABLE_LLM_RISK_JUDGE=false): nothing to predict"}
    questions = T.sft_splits(cfg)["judge"]
    per_kind = {"pairwise": len(reg.aligned) * len(questions) * 2, "risk": len(reg.variants) * len(questions)}
    requests = {k: per_kind[k] for k in on}
    key, url = ctx.secret("OPENAI_API_KEY"), jc.base_url or DEFAULT_BASE_URL
    flags = ", ".join(f"{FLAGS[k][1]}=true" for k in on)
    if not key:
        return {"predicted_s": 0.0, "requests": sum(requests.values()),
                "basis": f"{flags} but OPENAI_API_KEY is not set: the judge stage stops before judging, so nothing "
                         "was measured (set the key, or turn the judges off)"}
    _ready_to_generate(model)
    tok = models.load_tokenizer(base, padding_side="left")
    answers_batch_s, texts = timed_batch(model, tok, [prompt_of(q) for q in questions], cfg.eval.batch_size,
                                         jc.max_new_tokens)
    batches = -(-len(questions) // max(1, cfg.eval.batch_size))
    latency = one_request(jc, url, key, on[-1], questions[0], texts[0] if texts else "")
    if isinstance(latency, str):
        return {"predicted_s": None, "requests": sum(requests.values()), "reason": latency,
                "basis": f"{flags}: the one measured request failed, so the judges are not predicted"}
    out = K.predict_judge(requests, jc.concurrency, latency, len(reg.variants) * batches * answers_batch_s)
    return {**out, "answers_batch_s": answers_batch_s,
            "basis": f"{flags}: the planned requests in waves of judge.concurrency={jc.concurrency} at the latency "
                     "of one measured request (cached judgments make a re-run cheaper), plus the variants' answers "
                     "to the judge questions at one measured generation batch each"}


def one_request(jc, url: str, key: str, kind: str, question: dict, answer: str) -> float | str:
    """Seconds one judge request takes at the endpoint, or why it failed (the key never appears)."""
    import openai

    from pipeline import judgekit
    from pipeline.stages.judge import prompt_of
    text = "\n\n".join(m["content"] for m in prompt_of(question) if m["role"] == "user")
    item = {"question": text, "answer": answer, "answer_a": answer, "answer_b": answer}
    try:
        with openai.OpenAI(base_url=url, api_key=key, max_retries=jc.max_retries, timeout=jc.timeout_s) as client:
            t0 = time.monotonic()
            client.chat.completions.create(model=jc.model, messages=judgekit.build_messages(kind, item), temperature=0)
            return round(time.monotonic() - t0, 3)
    except Exception as exc:  # noqa: BLE001 - any failure: not predicted, with the reason
        return judgekit.scrub(f"one judge request to {judgekit.endpoint_host(url)} failed: {type(exc).__name__}: "
                              f"{str(exc)[:200]}", key)

"""The preflight's eval and judge measurements (pipeline/stages/preflight.py calls them on the base it loaded once).

eval: per eval set one generation batch (the seeded sample eval answers, at eval.batch_size and
eval.max_new_tokens), the log-likelihood protocol on a few of its questions (lm-eval, as the eval stage calls it),
and with eval.free_answer one free-answer batch, extrapolated to the set's questions x the variants, plus the
adapter switch measured on the SFT trial's adapter and the base load.
judge: when a judge is enabled, the variants' answers to the judge questions (one measured batch at
judge.max_new_tokens) plus the planned requests in waves of judge.concurrency at the latency of one request
measured against the configured endpoint; 0 with the reason when the judges are off or have no key.
The eval and judge stages' own functions build the prompts (read, not changed).
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline import evidence as ev
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


def loglik_rows(batch_size: int) -> int:
    """Questions per set the log-likelihood protocol is timed on: about one forward batch of lm-eval's requests
    (a question asks one per option: 3-5)."""
    return max(2, -(-batch_size // 4))


def timed_loglik(cfg, model, tok, rows: list[dict], batch_size: int) -> float:
    """Seconds lm-eval (pipeline/loglik.py, the eval stage's call) takes to score `rows` under protocol loglik."""
    from pipeline import loglik
    tasks = loglik.tasks_for(cfg, rows)
    return round(loglik.score(model, tok, tasks, rows, batch_size)[2], 3)


def timed_switch(model, adapter: str | None) -> float:
    """Seconds the eval stage spends per trained variant before it answers: the final's hash check and the
    adapter loaded onto the base (PeftModel.from_pretrained, as Variants does), on the adapter the SFT trial saved;
    the base is given back without it."""
    if adapter is None or not Path(adapter).is_dir():
        return 0.0
    from peft import PeftModel
    t0 = time.monotonic()
    ev.sha256_tree(Path(adapter))
    PeftModel.from_pretrained(model, adapter, adapter_name="preflight")
    secs = round(time.monotonic() - t0, 3)
    models.without_adapters(model)
    return secs


def eval_prediction(ctx, base: str, model, load_s: float, adapter: str | None = None) -> dict:
    from pipeline import eval_free, evalsets
    from pipeline.stages.eval import load_sets, messages
    cfg, ec = ctx.cfg, ctx.cfg.eval
    _ready_to_generate(model)
    tok = models.load_tokenizer(base, padding_side="left")
    per_set = {}
    for name, (rows, _full) in load_sets(cfg).items():
        if not rows:
            continue
        secs, _ = timed_batch(model, tok, [messages(r) for r in rows], ec.batch_size, ec.max_new_tokens)
        some = rows[:loglik_rows(ec.batch_size)]
        per_set[name] = {"questions": len(rows), "batch": min(ec.batch_size, len(rows)), "batch_s": secs,
                         "loglik_rows": len(some), "loglik_s": timed_loglik(cfg, model, tok, some, ec.batch_size)}
        if ec.free_answer and name in ec.free_answer_sets:
            per_set[name]["free_batch_s"] = timed_batch(model, tok, [evalsets.of(r).free_prompt(r) for r in rows],
                                                        ec.batch_size, ec.free_answer_max_new_tokens)[0]
    out = K.predict_generation(load_s, per_set, len(ctx.registry.variants),
                               free_variants=len(eval_free.VARIANTS) if ec.free_answer else 0,
                               switch_s=timed_switch(model, adapter))
    return {**out, "sets": per_set, "max_new_tokens": ec.max_new_tokens,
            "basis": "per set: one measured generation batch (the first of eval's seeded sample) x the set's batches, "
                     f"the log-likelihood protocol timed on its first {loglik_rows(ec.batch_size)} questions x the "
                     "set's questions"
                     + (", the free-answer protocol (base only) at one measured batch x the set's batches"
                        if ec.free_answer else "")
                     + "; x the variants, plus the measured adapter switch per trained variant and the base load; "
                       "the LLM answer-extraction fallback is not included"}


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

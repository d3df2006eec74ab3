"""Score base, SFT, DPO, SimPO and KTO on MedQA-USMLE, PubMedQA-L and CMMLU-medical.  Run: python -m pipeline run eval

Same seeded sample of question ids for every variant, all on one base model load (variants.Variants);
greedy batched generation with explicit decoding settings (HF, left padding);
answers extracted by evalkit's rules (then, optionally, an LLM that only extracts); accuracy with a
bootstrap CI, format failures, lengths, answer distributions against the gold (degenerate predictors), paired
McNemar tests against SFT and base with Holm-adjusted p-values (one family per protocol) and a paired bootstrap
CI of each difference, and the minimum detectable difference per set.
Two protocols on the same question ids: `generative_letter` (the above: `results`) and `loglik` (lm-evaluation-
harness's log-likelihood multiple choice through our task definitions, pipeline/loglik.py: `results_loglik`).
Writes reports/eval/predictions/<variant>.jsonl, reports/eval/predictions/loglik/<variant>.jsonl,
reports/eval_default.md, reports/eval/eval_default.json.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
from collections import Counter

from pipeline import data as D
from pipeline import eval_audit, eval_free, eval_report, evalkit, evalsets, judgekit, loglik, models
from pipeline import evidence as ev
from pipeline.core import SkipStage, StageFailed
from pipeline.provenance import git_commit
from pipeline.variants import Variants, base_model_path, decoding, generate, variant_table
from pipeline.core import Stage

STAGE = Stage("eval", "reports/eval/eval_default.json", needs=("sft",), needs_methods=True, reads=(
    *evalsets.reads(), "eval", "judge.model", "judge.base_url", "judge.concurrency", "judge.timeout_s",
    "judge.max_retries", "judge.max_reasks", "model.name", "model.tiny_seed", "runtime.force_skip_training",
    "runtime.rehearsal"), inputs=loglik.inputs, runs_after_skip=True, content=models.base_content)

DEFAULT_BASE_URL = "https://api.openai.com/v1"


def load_sets(cfg) -> dict:
    """{set: (sampled rows, full size)}: the seeded sample every variant answers."""
    out = {}
    for name in cfg.eval.sets:
        rows = evalsets.SETS[name].load(cfg)[0]
        out[name] = (D.sample_rows(rows, cfg.eval.sample_sizes.get(name), cfg.eval.seed), len(rows))
    return out


def messages(row: dict) -> list[dict]:
    """The prompt of the row's set (pipeline/evalsets/<set>.py)."""
    return evalsets.of(row).prompt(row)


def extract(row: dict, raw: str) -> tuple[str | None, str]:
    """The answer the output commits to, by the rules of the row's set."""
    return evalsets.of(row).extract(row, raw)


def fallback_setup(ctx) -> dict:
    cfg, key = ctx.cfg, ctx.secret("OPENAI_API_KEY")
    fb = {"enabled": cfg.eval.llm_fallback, "available": False, "reason": None, "model": cfg.judge.model,
          "endpoint": None, "n_sent": 0, "n_resolved": 0, "n_requests": 0, "n_cached": 0}
    if not cfg.eval.llm_fallback:
        return fb | {"reason": "ENABLE_V2_LLM_FALLBACK=false: unparsed answers count as format failures"}
    if not key:
        return fb | {"reason": "ENABLE_V2_LLM_FALLBACK=true but OPENAI_API_KEY is not set: rules only"}
    url = cfg.judge.base_url or DEFAULT_BASE_URL
    why = judgekit.check_endpoint(url, key, timeout_s=min(10.0, cfg.judge.timeout_s))
    return fb | {"available": why is None, "reason": why, "endpoint": judgekit.endpoint_host(url), "_url": url, "_key": key}


def allowed(row: dict) -> list[str]:
    """The answers a row accepts: its option letters (A-D) or its option words (yes, no, maybe)."""
    return list(row["options"])


def apply_fallback(ctx, fb: dict, variant: str, preds: list[dict], rows: list[dict]) -> None:
    """Answers the rules could not parse go to the LLM for extraction only; tagged method llm_fallback."""
    todo = [(p, r) for p, r in zip(preds, rows) if p["extracted"] is None]
    if not todo or not fb["available"]:
        return
    items = [{"question_id": r["id"], "variant": variant, "answer": p["raw"],
              "question": messages(r)[0]["content"] + f"\n\nAllowed answers: {', '.join(allowed(r))}, none"}
             for p, r in todo]
    cfg = ctx.cfg
    out = asyncio.run(judgekit.judge_all(
        items, kind="extract", base_url=fb["_url"], api_key=fb["_key"], model=cfg.judge.model,
        cache=judgekit.JudgeCache(ctx.path("reports/eval/llm_fallback_cache.jsonl")), concurrency=cfg.judge.concurrency,
        timeout_s=cfg.judge.timeout_s, max_retries=cfg.judge.max_retries, max_reasks=cfg.judge.max_reasks))
    fb.update(n_sent=fb["n_sent"] + len(items), n_requests=fb["n_requests"] + out["n_requests"],
              n_cached=fb["n_cached"] + out["n_cached"])
    for (p, r), res in zip(todo, out["results"]):
        answer = (res.get("verdict") or {}).get("answer", "")
        answer = {a.casefold(): a for a in allowed(r)}.get(answer.casefold(), answer)
        if answer in allowed(r):
            p.update(extracted=answer, method="llm_fallback", correct=answer == r["answer"])
            fb["n_resolved"] += 1
        else:   # the rules' failure stays the method; say what the LLM made of it
            p["llm_fallback"] = f"answered {answer!r}" if res["status"] == "judged" else f"unjudged ({res.get('reason')})"


def summarize(preds: list[dict], cfg, sets: list[str] | None = None) -> dict:
    """Per set (eval.sets, or `sets`): accuracy + CI, per-subject accuracy + CI, format failures, lengths, methods."""
    ci = lambda ps: evalkit.accuracy_ci([p["correct"] for p in ps], seed=cfg.eval.seed,  # noqa: E731
                                        n_resamples=cfg.eval.n_bootstrap)
    out = {}
    for name in sets or cfg.eval.sets:
        ps = [p for p in preds if p["set"] == name]
        fails = sum(p["extracted"] is None for p in ps)
        subjects = sorted({p["subject"] for p in ps})
        out[name] = ci(ps) | {
            "question_ids": [p["id"] for p in ps], "format_failures": fails,
            "format_failure_rate": fails / len(ps) if ps else None,
            "length_chars": evalkit.length_stats([p["raw"] for p in ps]),
            "methods": dict(Counter(p["method"] for p in ps)),
            "answers": evalkit.answer_distribution([p["extracted"] for p in ps], [p["gold"] for p in ps],
                                                   cfg.eval.degenerate_share),
            "by_subject": {s: ci([p for p in ps if p["subject"] == s]) for s in subjects}}
    return out


PROTOCOL = "generative_letter"   # greedy generation, "answer with the letter", rule extraction: `results`


def paired_tests(preds: dict, cfg, aligned: tuple[str, ...], protocol: str = PROTOCOL) -> list[dict]:
    """McNemar exact of SFT and each aligned variant against SFT and against base, on the same ids, with the paired
    bootstrap CI of the accuracy difference; Holm's adjustment over the family of this protocol's tests."""
    out = []
    for a in ("sft", *aligned):
        for b in ("sft", "base"):
            if a == b or a not in preds or b not in preds:
                continue
            for s in cfg.eval.sets:
                pa, pb = ([p for p in preds[v] if p["set"] == s] for v in (a, b))
                assert [p["id"] for p in pa] == [p["id"] for p in pb], f"{a} and {b} answered other ids on {s}"
                ca, cb = [p["correct"] for p in pa], [p["correct"] for p in pb]
                test = evalkit.mcnemar_exact(ca, cb)
                acc = lambda ps: sum(p["correct"] for p in ps) / len(ps) if ps else None  # noqa: E731
                out.append({"protocol": protocol, "a": a, "b": b, "set": s, "accuracy_a": acc(pa),
                            "accuracy_b": acc(pb), "difference": (acc(pa) - acc(pb)) if pa else None, **test,
                            "diff_ci": evalkit.diff_ci(ca, cb, seed=cfg.eval.seed, n_resamples=cfg.eval.n_bootstrap)})
    return evalkit.holm_by_protocol(out)


def power(sets: dict) -> dict:
    """The minimum detectable difference at each set's n (two-sided alpha, power: evalkit.ALPHA, POWER)."""
    return {"alpha": evalkit.ALPHA, "power": evalkit.POWER, "method": evalkit.MDD_METHOD,
            "sets": {s: {"n": len(rows), "difference": evalkit.min_detectable_difference(len(rows))}
                     for s, (rows, _) in sets.items()}}


def predict(ctx, vs, name: str, rows: list[dict], prompts: list[list[dict]], max_new_tokens: int | None = None,
            extractor=extract, label: str | None = None, used=None) -> list[dict]:
    """The variant's answers to every question, extracted by the rules and scored against the gold answer
    (`used`: the variant's (model, tokenizer) when the caller holds them already)."""
    cfg = ctx.cfg
    model, tok = used or vs.use(name)
    raws = generate(model, tok, prompts, cfg.eval.batch_size, max_new_tokens or cfg.eval.max_new_tokens, ctx.progress,
                    label or f"eval {name}")
    out = []
    for row, prompt, raw in zip(rows, prompts, raws):
        extracted, method = extractor(row, raw)
        out.append({"id": row["id"], "set": row["set"], "subject": row["subject"],
                    "prompt_sha256": hashlib.sha256(json.dumps(prompt, ensure_ascii=False).encode()).hexdigest(),
                    "raw": raw, "extracted": extracted, "gold": row["answer"],
                    "correct": extracted == row["answer"], "method": method})
    return out


def run(ctx) -> dict:
    cfg = ctx.cfg
    if cfg.runtime.force_skip_training:
        raise SkipStage("FORCE_SKIP_TRAINING=true: no trained variant to evaluate (unset it to train and evaluate)")
    if not ctx.plan.get("feasible"):
        raise SkipStage(f"hardware plan: {ctx.plan.get('feasible_reason', 'not feasible')} (no model is loaded)")
    for module, why in (("statsmodels", "Holm's correction of the paired tests"), ("lm_eval", "the loglik protocol")):
        if importlib.util.find_spec(module) is None:   # before the generation, not after it
            raise StageFailed(f"{module} is not installed ({why} needs it): "
                              "run `make venv` or `.venv/bin/pip install -r requirements.txt`")
    table, sets, fb = variant_table(ctx), load_sets(cfg), fallback_setup(ctx)
    rows = [r for name in cfg.eval.sets for r in sets[name][0]]
    prompts = [messages(r) for r in rows]
    tasks = loglik.tasks_for(cfg, rows)   # lm-eval's tasks over the bundled files: the same ids, built once
    preds, results, outputs = {}, {}, []
    ll_preds, results_ll, ll_seconds = {}, {}, {}
    with Variants(ctx) as vs:   # the base loads once; each trained variant is an adapter switched on it
        for name, entry in table.items():
            if entry["status"] != "scored":
                ctx.log(f"{name}: skipped, not scored ({entry['reason']})")
                continue
            model, tok = vs.use(name)
            preds[name] = predict(ctx, vs, name, rows, prompts, used=(model, tok))
            apply_fallback(ctx, fb, name, preds[name], rows)
            results[name] = summarize(preds[name], cfg)
            ll_preds[name], own, ll_seconds[name] = loglik.score(model, tok, tasks, rows, cfg.eval.batch_size)
            loglik.check_own(name, ll_preds[name], own)
            results_ll[name] = loglik.summarize(ll_preds[name], cfg)
            del model, tok
            for rel, items in ((eval_audit.PREDICTIONS.format(variant=name), preds[name]),
                               (loglik.PREDICTIONS.format(variant=name), ll_preds[name])):
                ev.atomic_write_text(ctx.path(rel), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in items))
                outputs.append(rel)
        free = None   # protocol free_answer_extraction: the base again, freely (pipeline/eval_free.py)
        if cfg.eval.free_answer and "base" in preds:
            free = eval_free.score(ctx, vs, sets, predict, summarize)
        memory = vs.memory()
    fb = {k: v for k, v in fb.items() if not k.startswith("_")}
    paired = (paired_tests(preds, cfg, ctx.registry.aligned)
              + paired_tests(ll_preds, cfg, ctx.registry.aligned, protocol=loglik.PROTOCOL))
    doc = {"model_name": models.display_name(cfg.tier, base := base_model_path(ctx)),
           "base_model": ev.root_relative(ctx.root, base),
           "variants": table, "results": results, "results_loglik": results_ll, "paired": paired,
           "protocols": {"results": PROTOCOL, "results_loglik": loglik.PROTOCOL},
           "loglik": loglik.describe(tasks, ll_seconds),
           "sets": {s: {"planned_n": len(r), "full_size": full, "question_ids": [x["id"] for x in r], "seed": cfg.eval.seed}
                    for s, (r, full) in sets.items()},
           "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens, "n_bootstrap": cfg.eval.n_bootstrap,
           "fallback": fb, "memory": memory, "min_detectable_difference": power(sets),
           "multiple_comparisons": {"method": "Holm-Bonferroni (statsmodels multipletests)", "alpha": evalkit.ALPHA,
                                    "family": "the paired tests of one protocol",
                                    "protocols": sorted({t["protocol"] for t in paired})},
           "generation": {"backend": "hf", "greedy": True, "padding_side": "left",
                          "batched_by_prompt_length": True, "decoding": decoding(cfg.eval.max_new_tokens)}}
    if free:
        doc |= {eval_free.KEY: free[0], "free_answer": free[1]}
        outputs += free[2]
    ev.atomic_write_text(ctx.path("reports/eval_default.md"), eval_report.eval_markdown(doc, cfg, git_commit())
                         + eval_free.markdown(doc))
    return doc | {"outputs": outputs + ["reports/eval_default.md"]}


# --- the gate's checks of this stage ----------------------------------------------------------------------
def required_sizes(cfg) -> dict:
    """{set: least n} the gate accepts, whatever eval.sets and eval.sample_sizes say: every bundled set
    (evalsets.NAMES), each with at least the tier's shipped sample size (configs/tiers/<tier>.yaml; none there,
    as for the thesis tiers: None, the full set); in a rehearsal its scaled size (readiness still wants full)."""
    from pipeline.settings import tier_file
    shipped = (tier_file(cfg.tier).get("eval") or {}).get("sample_sizes") or {}
    scaled = cfg.runtime.rehearsal_eval_samples if cfg.runtime.rehearsal else None
    return {s: min((n for n in (shipped.get(s), scaled) if n is not None), default=None) for s in evalsets.names()}


def checks(g, doc) -> list:
    """eval.coverage: every set on its planned question ids, every training method scored on its current final,
    every scored variant on the same ids."""
    rel, cfg = g.rel, g.cfg
    if not isinstance(doc, dict):
        return [g.result("coverage", [f"{rel} is missing: run `python -m pipeline run eval`"], "")]
    problems = [f"status is {doc.get('status')!r}: {doc.get('reason')}"] if doc.get("status") != "ok" else []
    problems += [f"does not match its schema: {e}" for e in ev.validate("eval", doc)[:1]]
    sets, variants = doc.get("sets") or {}, doc.get("variants") or {}
    planned, floor = {}, required_sizes(cfg)
    for name in dict.fromkeys([*floor, *cfg.eval.sets]):
        info = sets.get(name)
        if not isinstance(info, dict):
            problems.append(f"set {name} was not evaluated" + (
                "" if name in cfg.eval.sets else f" (eval.sets={list(cfg.eval.sets)} leaves it out; the gate "
                f"requires every bundled benchmark: {', '.join(floor)})"))
            continue
        size, full, ids = cfg.eval.sample_sizes.get(name), info.get("full_size"), info.get("question_ids") or []
        want = full if size is None else (min(size, full) if isinstance(full, int) else size)
        if info.get("planned_n") != want or len(ids) != want or len(set(map(str, ids))) != want:
            problems.append(f"set {name}: planned_n {info.get('planned_n')}, {len(ids)} question ids, the plan is "
                            f"{want}")
        least = full if floor.get(name) is None else min(floor[name], full if isinstance(full, int) else floor[name])
        if not isinstance(least, int) or not isinstance(info.get("planned_n"), int) or info["planned_n"] < least:
            problems.append(f"set {name}: {info.get('planned_n')} questions, the {cfg.tier} tier needs at least "
                            f"{least} ({'the full set' if floor.get(name) is None else 'configs/tiers/' + cfg.tier + '.yaml'}"
                            "): raise eval.sample_sizes or set it to null")
        planned[name] = (info.get("planned_n"), list(ids))
    for method in g.registry.methods:
        entry = variants.get(method)
        if not isinstance(entry, dict) or entry.get("status") != "scored":
            problems.append(f"variant {method} was not scored ({(entry or {}).get('reason', 'absent')})")
            continue
        metrics = g.doc(method) or {}
        if metrics.get("status") != "ok" or not metrics.get("checkpoint_sha256"):
            problems.append(f"variant {method} is marked scored but the {method} stage has no ok final checkpoint")
        elif "checkpoint_sha256" in entry and entry["checkpoint_sha256"] != metrics["checkpoint_sha256"]:
            problems.append(f"variant {method} was scored on a checkpoint that is not the current {method} final")
    for variant, entry in variants.items():
        if isinstance(entry, dict) and entry.get("status") == "scored":
            for field in ("results", "results_loglik"):   # both protocols, on the planned ids
                for name, (n, ids) in planned.items():
                    res = ((doc.get(field) or {}).get(variant) or {}).get(name)
                    if not isinstance(res, dict) or res.get("n") != n:
                        problems.append(f"{field}: variant {variant} on {name}: n {(res or {}).get('n')}, planned {n}")
                    elif list(res.get("question_ids") or []) != ids:
                        problems.append(f"{field}: variant {variant} on {name} used other question ids than planned")
    sizes = ", ".join(f"{k} {v[0]}" for k, v in planned.items())
    coverage = g.result("coverage", problems[:8], f"{', '.join(g.registry.methods)} scored on the same question ids "
                        f"({sizes}) under both protocols", code=doc.get("reason_code"))
    if problems:
        return [coverage, g.blocked("numbers", "coverage")]
    from pipeline.eval_audit import audit
    wrong = audit(cfg, g.root, doc, g.registry.aligned) + eval_free.audit(cfg, g.root, doc)
    return [coverage, g.result("numbers", wrong[:8] + ([f"{len(wrong) - 8} more"] if len(wrong) > 8 else []),
                               "every accuracy, CI, count and paired test of both protocols recomputes from the "
                               "re-scored predictions")]

"""Protocol free_answer_extraction (`results_free` in reports/eval/eval_default.json), run by the eval stage when
eval.free_answer is true (configs/tiers/7b.yaml, 14b.yaml; off on the smoke tiers).

The base answers each question of eval.free_answer_sets zero-shot and freely (the set's free_prompt: the question,
its options, "end with 'The answer is X'"), greedily, up to eval.free_answer_max_new_tokens; the set's own rules read
the answer its conclusion commits to (evalkit.extract_conclusion); no LLM fallback. It is the protocol of the
published HuatuoGPT-o1 figures for Qwen2.5-Instruct (configs/references.yaml), so the base model can be held against
them (pipeline/anchors.py, the readiness check). Same seeded question ids as the other protocols; per-question
predictions in reports/eval/predictions/free/base.jsonl.
"""
from __future__ import annotations

import json

from pipeline import evalkit, evalsets
from pipeline import evidence as ev

PROTOCOL, KEY = "free_answer_extraction", "results_free"
VARIANTS = ("base",)   # the one model with published figures; the trained variants are ours
PREDICTIONS = "reports/eval/predictions/free/{v}.jsonl"


def extract(row: dict, raw: str) -> tuple[str | None, str]:
    return evalkit.extract_conclusion(raw, lambda text: evalsets.of(row).extract(row, text))


def score(ctx, vs, sets: dict, predict, summarize) -> tuple[dict, dict, list[str]]:
    """(results_free, its setup for the evidence, the files written) for VARIANTS scored in this run. `predict` and
    `summarize` are the eval stage's (same prediction fields, same statistics)."""
    cfg = ctx.cfg
    names = [s for s in cfg.eval.free_answer_sets if s in sets]
    rows = [r for s in names for r in sets[s][0]]
    prompts = [evalsets.of(r).free_prompt(r) for r in rows]
    results, outputs = {}, []
    for v in VARIANTS:
        preds = predict(ctx, vs, v, rows, prompts, max_new_tokens=cfg.eval.free_answer_max_new_tokens,
                        extractor=extract, label=f"eval {v} (free answer)")
        results[v] = summarize(preds, cfg, sets=names)
        rel = PREDICTIONS.format(v=v)
        ev.atomic_write_text(ctx.path(rel), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
        outputs.append(rel)
    setup = {"protocol": PROTOCOL, "sets": names, "variants": list(VARIANTS), "shots": 0,
             "max_new_tokens": cfg.eval.free_answer_max_new_tokens, "fallback": "not used (rules only)",
             "extraction": "evalkit.extract_conclusion with the set's rules"}
    return results, setup, outputs


def audit(cfg, root, doc: dict) -> list[str]:
    """The gate's recomputation of results_free (check eval.numbers, beside eval_audit's of `results`): each
    predictions file re-hashes to its recorded sha256, each item's gold is the bundled answer and its extracted
    answer what the rules get from its raw output, and the figures recompute field for field."""
    import dataclasses

    from pipeline.eval_audit import diff
    from pipeline.stages.eval import summarize
    block, setup, out = doc.get(KEY), doc.get("free_answer") or {}, []
    if not block:
        return []
    names = [s for s in setup.get("sets") or [] if s in evalsets.SETS]
    gold = {r["id"]: r for s in names for r in evalsets.SETS[s].load(cfg)[0]}
    seeds = {info.get("seed") for info in (doc.get("sets") or {}).values() if isinstance(info, dict)}
    at = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, seed=seeds.pop() if len(seeds) == 1 else
                                                           cfg.eval.seed, n_bootstrap=doc.get("n_bootstrap")))
    for v in block:
        rel = PREDICTIONS.format(v=v)
        path = root / rel
        if not path.is_file() or ev.sha256_file(path) != (doc.get("outputs") or {}).get(rel):
            out.append(f"{rel} is missing or does not re-hash to the sha256 the eval evidence records")
            continue
        preds = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for p in preds:
            row = gold.get(p.get("id"))
            if row is None or tuple(extract(row, p.get("raw") or "")) != (p.get("extracted"), p.get("method")) \
                    or p.get("gold") != row["answer"] or p.get("correct") is not (p.get("extracted") == row["answer"]):
                out.append(f"{rel}: {p.get('id')}: not what the bundled data and the rules give")
                break
        diff(block[v], summarize(preds, at, sets=names), f"{KEY}.{v}", out)
    return out


def markdown(doc: dict) -> str:
    """The eval_default.md section of this protocol ('' when it did not run)."""
    from pipeline.reporting import acc_cell, md_table
    block, setup = doc.get(KEY), doc.get("free_answer") or {}
    if not block:
        return ""
    sets = setup.get("sets") or []
    rows = [[v] + [acc_cell(res.get(s)) for s in sets] for v, res in block.items()]
    return "\n".join(["", f"## Accuracy under protocol `{PROTOCOL}`", "",
                      f"Zero-shot free answer (max_new_tokens {setup.get('max_new_tokens')}), the answer read from "
                      "its conclusion by the same rules; no LLM fallback.", "",
                      md_table(["variant"] + [f"{s} accuracy [95% CI]" for s in sets], rows), "",
                      f"(Source: `reports/eval/eval_default.json`, fields `{KEY}.<variant>.<set>`; per question "
                      f"`{PREDICTIONS.format(v='<variant>')}`.)", ""])

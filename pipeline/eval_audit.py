"""The gate's recomputation of every figure eval_default.json quotes (check `eval.numbers`).

A figure in the evidence is believed only if the gate gets it again from the per-item predictions:
  1. each predictions file re-hashes to the sha256 the eval evidence records for it;
  2. each item is re-scored: its gold answer comes from the bundled data (by id), its extracted answer from its
     raw output by the set's rules (an LLM-fallback answer must be one of the options), `correct` from the two;
  3. the accuracies, CIs, counts, format failures, lengths, methods, answer distributions, per-subject figures and
     the paired tests (p, Holm's p, paired CI) and the minimum detectable differences are recomputed with the eval stage's own functions (summarize, paired_tests) at the seed and
     bootstrap size the evidence records, and must equal what the evidence says, field for field; a field the
     functions do not produce is itself a problem (nothing quoted is left uncovered).
The loglik protocol's figures (`results_loglik`, its paired tests) are held the same way against
reports/eval/predictions/loglik/<variant>.jsonl: each item's gold and choices against the bundled data, its
prediction, acc and acc_norm against what lm-eval's scoring makes of its recorded log-likelihoods
(loglik.rescore_item), then every figure recomputed with loglik.summarize.
A forger who rewrites raw outputs and every hash consistently still passes: `make export`'s root hash is the
external anchor for that (issue 14 §2).
"""
from __future__ import annotations

import dataclasses
import json
import math

from pipeline import evalsets
from pipeline import evidence as ev

PREDICTIONS = "reports/eval/predictions/{variant}.jsonl"   # the generative protocol's per-question records


def read_predictions(root, variant: str, pattern: str = PREDICTIONS) -> list[dict]:
    """A variant's per-question records (OSError or ValueError when the file is missing or unreadable)."""
    text = (root / pattern.format(variant=variant)).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def diff(got, want, where: str, out: list[str]) -> None:
    """Where got (the evidence) differs from want (recomputed): one line each."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(got) | set(want), key=str):
            if k not in want:
                out.append(f"{where}.{k} is quoted but not produced by the eval's functions")
            elif k not in got:
                out.append(f"{where}.{k} is missing")
            else:
                diff(got[k], want[k], f"{where}.{k}", out)
    elif isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        if len(got) != len(want):
            out.append(f"{where}: {len(got)} entries, recomputed {len(want)}")
        for i, (a, b) in enumerate(zip(got, want)):
            diff(a, b, f"{where}[{i}]", out)
    elif isinstance(want, float) or isinstance(got, float):
        ok = (isinstance(got, (int, float)) and not isinstance(got, bool) and isinstance(want, (int, float))
              and (math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(got) and math.isnan(want))))
        if not ok:
            out.append(f"{where} is {got!r}, recomputed {want!r}")
    elif got != want:
        out.append(f"{where} is {str(got)[:60]!r}, recomputed {str(want)[:60]!r}")


def load_predictions(root, doc: dict, out: list[str], field: str = "results", pattern: str = PREDICTIONS) -> dict:
    """{variant: [prediction]} of every variant with `field`, each file verified against the recorded sha256."""
    outputs, preds = doc.get("outputs") or {}, {}
    for variant in doc.get(field) or {}:
        rel = pattern.format(variant=variant)
        path = root / rel
        if not path.is_file():
            out.append(f"{rel} is missing: the figures of {variant} cannot be recomputed")
        elif ev.sha256_file(path) != outputs.get(rel):
            out.append(f"{rel} does not re-hash to the sha256 the eval evidence records")
        else:
            preds[variant] = read_predictions(root, variant, pattern)
    return preds


def bundled(cfg, *preds: dict) -> dict:
    """{id: row} of the bundled data of every set the predictions name."""
    names = sorted({p.get("set") for pr in preds for ps in pr.values() for p in ps if p.get("set") in evalsets.SETS})
    return {r["id"]: r for name in names for r in evalsets.SETS[name].load(cfg)[0]}


def _report(out: list[str], what: str, bad: list[str]) -> None:
    out += [f"{what}: {b}" for b in bad[:3]] + ([f"{what}: {len(bad) - 3} more items like these"] if len(bad) > 3 else [])


def _with_gold(gold: dict, preds: list, bad: list[str]):
    """(item, its bundled question) for each predicted item; an item that is no bundled question goes to `bad`."""
    for p in preds:
        row = gold.get(p.get("id"))
        if row is None:
            bad.append(f"{p.get('id')}: not a question of the bundled data")
        else:
            yield p, row


def rescore_loglik(gold: dict, preds: dict, out: list[str]) -> None:
    """Each loglik item's task, choices and gold against the bundled data, its verdicts against lm-eval's scoring
    of its own log-likelihoods."""
    from pipeline.loglik import rescore_item
    from pipeline.stages.eval import allowed
    for variant, ps in preds.items():
        bad = []
        for p, row in _with_gold(gold, ps, bad):
            choices, lls = p.get("choices"), p.get("loglik")
            if (p.get("task") != evalsets.of(row).lm_eval_task(row) or choices != allowed(row)
                    or p.get("gold") != row["answer"] or p.get("target") != choices.index(row["answer"])):
                bad.append(f"{p['id']}: task, choices or gold are not the bundled question's")
            elif not (isinstance(lls, list) and len(lls) == len(choices)
                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lls)):
                bad.append(f"{p['id']}: {len(lls) if isinstance(lls, list) else 'no'} log-likelihoods for "
                           f"{len(choices)} choices")
            else:
                want = rescore_item(p) | {"correct": rescore_item(p)["acc"] == 1.0, "method": "loglik"}
                want["raw"] = want["extracted"]
                wrong = [k for k, v in want.items() if p.get(k) != v]
                if wrong:
                    bad.append(f"{p['id']}: {', '.join(wrong)} are not what its log-likelihoods give")
        _report(out, f"loglik predictions of {variant}", bad)


def rescore(cfg, preds: dict, out: list[str], gold: dict | None = None) -> None:
    """Each item's gold, extracted answer and verdict, against the bundled data and the set's rules."""
    from pipeline.stages.eval import allowed, extract
    gold = bundled(cfg, preds) if gold is None else gold
    for variant, ps in preds.items():
        bad = []
        for p, row in _with_gold(gold, ps, bad):
            if p.get("method") == "llm_fallback":
                fine = p.get("extracted") in allowed(row)
            else:
                fine = tuple(extract(row, p.get("raw") or "")) == (p.get("extracted"), p.get("method"))
            if not fine:
                bad.append(f"{p['id']}: extracted {p.get('extracted')!r} is not what the rules get from its output")
            elif p.get("gold") != row["answer"] or p.get("correct") is not (p.get("extracted") == row["answer"]):
                bad.append(f"{p['id']}: gold/correct do not match the bundled answer {row['answer']!r}")
        _report(out, f"predictions of {variant}", bad)


def audit(cfg, root, doc: dict, aligned: tuple[str, ...]) -> list[str]:
    """The problems with the figures of the eval evidence `doc` (empty: every figure recomputes)."""
    from pipeline import loglik
    from pipeline.stages.eval import paired_tests, power, summarize
    out: list[str] = []
    preds = load_predictions(root, doc, out)
    ll_preds = load_predictions(root, doc, out, "results_loglik", loglik.PREDICTIONS)
    if not doc.get("results_loglik") and doc.get("results"):
        out.append("results_loglik is missing: the loglik protocol's figures are not in the evidence")
    if out:
        return out
    gold = bundled(cfg, preds, ll_preds)
    rescore(cfg, preds, out, gold)
    rescore_loglik(gold, ll_preds, out)
    sets = doc.get("sets") or {}
    seeds = {info.get("seed") for info in sets.values() if isinstance(info, dict)}
    if len(seeds) > 1 or not isinstance(doc.get("n_bootstrap"), int):
        return out + [f"the eval evidence records seeds {sorted(map(str, seeds))} and n_bootstrap "
                      f"{doc.get('n_bootstrap')!r}: the figures cannot be recomputed"]
    ecfg = dataclasses.replace(cfg.eval, sets=[s for s in evalsets.names() if s in sets],
                               seed=seeds.pop() if seeds else cfg.eval.seed, n_bootstrap=doc["n_bootstrap"])
    at = dataclasses.replace(cfg, eval=ecfg)
    diff(doc.get("results"), {v: summarize(ps, at) for v, ps in preds.items()}, "results", out)
    diff(doc.get("results_loglik"), {v: loglik.summarize(ps, at) for v, ps in ll_preds.items()}, "results_loglik", out)
    diff(doc.get("paired"), paired_tests(preds, at, aligned)
         + paired_tests(ll_preds, at, aligned, protocol=loglik.PROTOCOL), "paired", out)
    diff(doc.get("min_detectable_difference"),
         power({s: (info.get("question_ids") or [], info.get("full_size")) for s, info in sets.items()}),
         "min_detectable_difference", out)
    return out

"""The thesis reports, built only from evidence files.  Run: python -m pipeline run reports

Writes reports/sota_compare.md, reports/error_analysis.md, reports/thesis_support/thesis_draft_material.md,
reports/thesis_support/experiment_record.json and reports/figures/eval_accuracy.png; runs (and says so)
when variants, the eval or the judges were skipped. Published numbers come only from configs/references.yaml, and
stand beside ours only under the same protocol (pipeline/anchors.py).
"""
from __future__ import annotations

import json

from pipeline import anchors as A
from pipeline import data as D
from pipeline import evalsets
from pipeline import evidence as ev
from pipeline import reporting as R
from pipeline import root_hash
from pipeline.core import Stage, StageFailed
from pipeline.eval_audit import PREDICTIONS, read_predictions

STAGE = Stage("reports", "reports/thesis_support/reports_manifest.json", needs=("eval", "judge"), reads=("*",),
              inputs=lambda cfg: R.reference_files(cfg) + D.files("sft_path", "preference_path", "kto_path")(cfg)
              + evalsets.files(cfg), runs_after_skip=True)

FILES = {"sota": "reports/sota_compare.md", "errors": "reports/error_analysis.md",
         "draft": "reports/thesis_support/thesis_draft_material.md",
         "record": "reports/thesis_support/experiment_record.json", "figure": "reports/figures/eval_accuracy.png"}


def predictions(ctx, variants: list[str]) -> dict:
    """{variant: its per-question records} ([] where eval wrote none)."""
    return {v: read_predictions(ctx.root, v) if (ctx.root / PREDICTIONS.format(variant=v)).is_file() else []
            for v in variants}


def eval_state(doc: dict | None) -> list[str]:
    """Lines that say what was not measured and why (empty when everything ran)."""
    if not doc:
        return ["The eval stage has not run: no measured numbers exist (`python -m pipeline run eval`)."]
    if doc.get("status") != "ok":
        return [f"The eval stage was {doc.get('status')}: {doc.get('reason')}. No measured numbers exist for this run."]
    return [f"Variant {line[2:]}" for line in R.skipped_lines(doc)]


def sota_compare(ctx, eval_doc, refs: list[dict]) -> str:
    lines = ["# Comparison with published results", "", "## 1. This run: measured on the same questions", ""]
    lines += eval_state(eval_doc) + [""]
    if R.scored(eval_doc):
        lines += [R.results_table(eval_doc), "", f"(Source: `{R.EVAL_JSON}`, fields `results.<variant>.<set>`.)", "",
                  "Paired tests (exact McNemar on the same question ids, Holm-adjusted per protocol):", "",
                  R.paired_table(eval_doc), "", *R.statistics_lines(eval_doc), "",
                  f"(Source: `{R.EVAL_JSON}`, fields `paired` and `min_detectable_difference`.)", ""]
    lines += A.sota_lines(eval_doc or {}, refs, ctx.cfg.readiness.anchor_tolerance_points)
    return "\n".join(lines)


def error_analysis(ctx, eval_doc, judge_doc) -> str:
    src = f"(Source: `{R.EVAL_JSON}` and `reports/eval/predictions/<variant>.jsonl`.)"
    lines = ["# Error analysis", ""] + eval_state(eval_doc) + [""]
    variants = R.scored(eval_doc)
    preds = predictions(ctx, variants)
    for s in (eval_doc or {}).get("sets") or {} if variants else []:
        subjects = sorted({k for v in variants for k in eval_doc["results"][v][s]["by_subject"]})
        lines += [f"## {s}: accuracy by subject / step", "", R.md_table(["subject"] + variants, [
            [subj] + [R.acc_cell(eval_doc["results"][v][s]["by_subject"].get(subj)) for v in variants] for subj in subjects]), "", src, ""]
        wrong = [p["id"] for p in preds[variants[0]] if p["set"] == s
                 and all(not q["correct"] for v in variants for q in preds[v] if q["id"] == p["id"])]
        lines += [f"Questions every scored variant gets wrong: {len(wrong)} of {eval_doc['sets'][s]['planned_n']}"
                  + (f" (first: {', '.join(wrong[:10])})" if wrong else "") + f". {src}", ""]
    if "sft" in preds:
        rows = []
        for v in (a for a in ctx.registry.aligned if a in preds):
            for s in eval_doc["sets"]:
                pairs = [(p, q) for p, q in zip(preds["sft"], preds[v]) if p["set"] == s]
                helped = [q["id"] for p, q in pairs if q["correct"] and not p["correct"]]
                hurt = [q["id"] for p, q in pairs if p["correct"] and not q["correct"]]
                rows.append([v, s, len(helped), len(hurt), ", ".join((helped + hurt)[:5]) or "-"])
        lines += ["## Flips against SFT (helped: SFT wrong, variant right; hurt: the reverse)", "",
                  R.md_table(["variant", "set", "helped", "hurt", "example ids"], rows), "", src, ""]
    if variants:
        lines += ["## Answers against the gold (degenerate predictors)", "", R.answers_table(eval_doc), "",
                  *R.degenerate_lines(eval_doc), "",
                  f"(Source: `{R.EVAL_JSON}`, `results.<variant>.<set>.answers`.)", ""]
        lines += ["## Format failures (no answer extracted)", ""]
        for v in variants:
            bad = [p for p in preds[v] if p["extracted"] is None]
            lines.append(f"- **{v}**: {len(bad)} of {len(preds[v])} {src}")
            lines += [f"  - `{p['id']}` ({p['method']}): {json.dumps(p['raw'][:120], ensure_ascii=False)}" for p in bad[:3]]
        sets = list(eval_doc["sets"])
        lines += ["", "## Answer length (characters, mean) per variant", "", R.md_table(["variant"] + sets, [
            [v] + [f"{(eval_doc['results'][v][s]['length_chars'] or {}).get('mean') or 0:.1f}" for s in sets] for v in variants]),
            "", f"(Source: `{R.EVAL_JSON}`, `results.<variant>.<set>.length_chars`.)", ""]
    lines += judge_findings(judge_doc)
    return "\n".join(lines)


def judge_findings(doc) -> list[str]:
    lines = ["## LLM judges", ""]
    if not doc or doc.get("status") != "ok":
        return lines + [f"The judge stage did not run to completion ({(doc or {}).get('status', 'missing')}: "
                        f"{(doc or {}).get('reason')}).", ""]
    pw, risk = doc.get("pairwise") or {}, doc.get("risk") or {}
    if pw.get("enabled"):
        rows = [[v, R.pct(e["win_rate"]), R.pct(e["tie_rate"]), R.pct(e["loss_rate"]), R.pct(e["order_inconsistency_rate"]),
                 f"{e['length_chars'][v]['mean'] or 0:.0f} / {e['length_chars']['sft']['mean'] or 0:.0f}",
                 f"{R.pct(e['length_controlled']['win_rate'])} (n={e['length_controlled']['n_pairs']})"]
                for v, e in (pw.get("per_variant") or {}).items()]
        lines += [f"Pairwise vs SFT, coverage {R.pct(pw['coverage'])} ({pw['judged']}/{pw['planned']}):", "",
                  R.md_table(["variant", "win", "tie", "loss", "order inconsistency", "mean length variant / sft",
                              "length-controlled win"], rows), "", f"(Source: `{R.JUDGE_JSON}`, field `pairwise`.)", ""]
    else:
        lines += ["Pairwise judge: disabled (ENABLE_LLM_JUDGE=false).", ""]
    if risk.get("enabled"):
        levels = ("none", "low", "medium", "high", "critical")
        rows = [[v, *(e["levels"][lv] for lv in levels), e["unjudged"]] for v, e in (risk.get("per_variant") or {}).items()]
        lines += [f"Risk judge, coverage {R.pct(risk['coverage'])} ({risk['judged']}/{risk['planned']}):", "",
                  R.md_table(["variant", *levels, "unjudged"], rows), ""]
        lines += [f"- `{f['question_id']}` {f['variant']}: {f['level']} ({', '.join(f['categories'])}): {f['explanation']}"
                  for f in (risk.get("high_or_critical") or [])[:10]]
        lines += ["", f"(Source: `{R.JUDGE_JSON}`, field `risk`.)", ""]
    else:
        lines += ["Risk judge: disabled (ENABLE_LLM_RISK_JUDGE=false).", ""]
    return lines


def run(ctx) -> dict:
    eval_doc, judge_doc = ctx.evidence("eval"), ctx.evidence("judge")
    try:
        refs = A.load_references()
    except A.ReferenceError as exc:
        raise StageFailed(str(exc)) from None
    evidence_root = root_hash.of_root(ctx.root, ctx.registry)   # nothing this stage writes is inside it
    texts = {"sota": sota_compare(ctx, eval_doc, refs), "errors": error_analysis(ctx, eval_doc, judge_doc),
             "draft": R.thesis_draft(ctx, eval_doc, judge_doc) + root_lines(evidence_root)}
    for key, text in texts.items():
        ev.atomic_write_text(ctx.path(FILES[key]), text)
    ev.atomic_write_json(ctx.path(FILES["record"]), {**R.experiment_record(ctx, judge_doc),
                                                     "evidence_root": evidence_root})
    outputs = [FILES[k] for k in ("sota", "errors", "draft", "record")]
    figure = None
    if R.scored(eval_doc):
        figure = R.plot_accuracy({v: eval_doc["results"][v] for v in R.scored(eval_doc)}, list(eval_doc["sets"]),
                                 ctx.path(FILES["figure"]))
    outputs += [FILES["figure"]] if figure else []
    notes = eval_state(eval_doc) + ([] if figure else ["no accuracy figure: nothing was scored"])
    return {"files": outputs, "references": len(refs), "evidence_root": evidence_root,
            "eval_status": (eval_doc or {}).get("status"),
            "judge_status": (judge_doc or {}).get("status"), "notes": notes, "outputs": outputs}


def root_lines(evidence_root: dict) -> str:
    return "\n".join(["", "## Evidence root", "",
                      f"sha256 `{evidence_root['sha256']}` over {evidence_root['files']} files ({evidence_root['scope']}; "
                      f"{FILES['record']}: evidence_root). Quote it in the thesis: `make export` prints the same hash "
                      "for an archive of this run and `make verify-export` recomputes it from the archive's files.", ""])


def checks(g, doc) -> list:
    """reports.evidence_root: the root hash the thesis material quotes is the root's now."""
    if not doc or doc.get("status") != "ok":
        return []   # chain.stages says it did not run
    record = ev.read_json(g.root / FILES["record"]) or {}
    problems = root_hash.problems(g.root, g.registry, record.get("evidence_root"))
    return [g.result("evidence_root", [f"{FILES['record']} {p}" for p in problems],
                     f"the thesis material quotes the root's evidence hash {record.get('evidence_root', {}).get('sha256', '')[:12]}",
                     FILES["record"], code="evidence_root")]

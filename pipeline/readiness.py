"""Thesis readiness (strict_pass + a thesis tier + the full-size eval + every thesis artifact) and the two
verdicts' Markdown, recomputed from the files every time by `python -m pipeline check` (pipeline.gate.main)."""
from __future__ import annotations

from pathlib import Path

from pipeline import evalsets
from pipeline import evidence as ev

READINESS = "reports/thesis_support/thesis_readiness.json"
ARTIFACTS = ("reports/eval_default.md", "reports/sota_compare.md", "reports/error_analysis.md",
             "reports/thesis_support/thesis_draft_material.md", "reports/thesis_support/experiment_record.json")
REHEARSAL_BLOCKER = "rehearsal: the weights were a stand-in"


def rehearsal_evidence(cfg, registry=None) -> list[str]:
    """The evidence files that say the run was a rehearsal (a `rehearsal` entry: gpu_check, training metrics)."""
    from pipeline.gate import GPU_CHECK, _registry
    registry = _registry(registry)
    files = [GPU_CHECK] + [registry[m].evidence(cfg) for m in registry.methods]
    docs = {rel: ev.read_json(Path(cfg.root) / rel) for rel in files}
    return [rel for rel, d in docs.items() if isinstance(d, dict) and d.get("rehearsal") not in (None, False)]


def degenerate_blockers(cfg, eval_doc: dict, methods) -> list[str]:
    """A trained variant that answers one thing to most questions of a set is not a result. Recomputed from the
    per-question predictions with the current eval.degenerate_share (the flag in eval_default.json is not read
    back). The base is exempt: its habits are the starting point, not the method's outcome."""
    import json

    from pipeline.evalkit import answer_distribution
    out, variants = [], eval_doc.get("variants") or {}
    for v in (m for m in methods if (variants.get(m) or {}).get("status") == "scored"):
        rel = f"reports/eval/predictions/{v}.jsonl"
        try:
            preds = [json.loads(line) for line in (Path(cfg.root) / rel).read_text(encoding="utf-8").splitlines()]
        except (OSError, ValueError) as e:
            out.append(f"{rel} is missing or unreadable ({type(e).__name__}): the answers of {v} cannot be checked "
                       "for a degenerate predictor; re-run `python -m pipeline run eval`")
            continue
        for s in dict.fromkeys(p.get("set") for p in preds):
            ps = [p for p in preds if p.get("set") == s]
            a = answer_distribution([p.get("extracted") for p in ps], [p.get("gold") for p in ps],
                                    cfg.eval.degenerate_share)
            if a["degenerate"]:
                out.append(f"variant {v} is a degenerate predictor on {s}: it answers {a['top_answer']!r} to "
                           f"{a['top_share']:.0%} of the questions while the gold's largest share is "
                           f"{a['gold_top_share']:.0%} (eval.degenerate_share {a['threshold']:.0%}; answer "
                           "distributions in reports/eval_default.md): retrain it before writing")
    return out


def thesis_readiness(cfg, strict_pass: bool, registry=None) -> dict:
    from pipeline.gate import GATE, _registry
    from pipeline.settings import GPU_TIERS
    registry = _registry(registry)
    root = Path(cfg.root)
    blockers = []
    if not strict_pass:
        blockers.append(f"the strict completion check does not pass (see {GATE.replace('.json', '.md')})")
    if cfg.tier not in GPU_TIERS:
        blockers.append(f"tier {cfg.tier} is a smoke tier: never ready for writing (use MODEL_TIER=7b or 14b on a "
                        "GPU)")
    rehearsal = rehearsal_evidence(cfg, registry)
    if rehearsal:
        blockers.append(REHEARSAL_BLOCKER)
    eval_doc = ev.read_json(root / registry["eval"].evidence(cfg))
    eval_doc = eval_doc if isinstance(eval_doc, dict) else {}
    sets = eval_doc.get("sets") or {}
    partial = [f"{n} ({sets[n].get('planned_n')} of {sets[n].get('full_size')})" if isinstance(sets.get(n), dict)
               else f"{n} (not evaluated)" for n in evalsets.names()
               if not isinstance(sets.get(n), dict) or sets[n].get("planned_n") != sets[n].get("full_size")
               or not sets[n].get("full_size")]
    if partial:
        blockers.append(f"the eval is not on the full sets: {', '.join(partial)}; set eval.sample_sizes to null and keep every set in eval.sets")
    blockers += degenerate_blockers(cfg, eval_doc, registry.methods)
    present = {a: (root / a).is_file() for a in ARTIFACTS}
    figures = sorted(p.relative_to(root).as_posix() for p in (root / "reports/figures").glob("*.png"))
    missing = [a for a, ok in present.items() if not ok] + ([] if figures else ["reports/figures/*.png"])
    if missing:
        blockers.append(f"missing thesis artifact(s): {', '.join(missing)} (run `python -m pipeline run reports`)")
    from pipeline.provenance import now
    return {"ready_for_writing": not blockers, "blockers": blockers, "tier": cfg.tier, "strict_pass": strict_pass,
            "rehearsal": rehearsal, "eval_full_size": not partial, "artifacts": present, "figures": figures,
            "checked_at": now()}


def readiness_markdown(r: dict) -> str:
    head = "ready for writing" if r["ready_for_writing"] else "NOT ready for writing"
    lines = [f"# Thesis readiness: {head}", "", f"Tier `{r['tier']}`, checked {r['checked_at']}.", ""]
    lines += (["## Blockers", ""] + [f"- {b}" for b in r["blockers"]]) if r["blockers"] else ["No blockers."]
    lines += ["", "## Artifacts", ""] + [f"- [{'x' if ok else ' '}] {a}" for a, ok in r["artifacts"].items()]
    lines.append(f"- [{'x' if r['figures'] else ' '}] figures: {', '.join(r['figures']) or 'none'}")
    return "\n".join(lines) + "\n"


def gate_markdown(gate: dict) -> str:
    checks = gate["checks"]
    roots = [c for c in checks if not c["passed"] and not c.get("blocked_by")]
    blocked = [c for c in checks if not c["passed"] and c.get("blocked_by")]
    lines = [f"# Completion check: strict_pass {str(gate['strict_pass']).lower()}", "",
             f"Tier `{gate['tier']}`, root `{gate['root']}`, checked {gate['checked_at']}, commit "
             f"`{gate['git_commit']}`.",
             f"{len(checks) - len(gate['failed'])} of {len(checks)} checks pass; the checkpoint probes loaded the "
             f"base {gate['base_loads']}x, at most {gate['max_live_models']} model(s) alive.", ""]
    if roots:
        lines += ["## Failing (fix these first)", ""]
        lines += [f"- **{c['id']}** ({c['evidence']}): {c['detail']}\n  - what to do: {c['todo']}" for c in roots]
        lines.append("")
    if blocked:
        lines += ["## Not checked (blocked by a failure above)", "",
                  ", ".join(f"`{c['id']}`" for c in blocked), ""]
    lines += ["## Passing", ""] + [f"- {c['id']}: {c['detail']}" for c in checks if c["passed"]]
    return "\n".join(lines) + "\n"

"""Thesis readiness (strict_pass + a thesis tier + the full-size eval + every thesis artifact) and the two
verdicts' Markdown, recomputed from the files every time by `python -m pipeline check` (pipeline.gate.main)."""
from __future__ import annotations

from pathlib import Path

from pipeline import evalsets
from pipeline import evidence as ev
from pipeline.eval_audit import PREDICTIONS, read_predictions

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


def _predictions_by_set(root: Path, v: str) -> dict | Exception:
    """{set: [prediction rows]} of variant v's per-question predictions file, or the exception reading it."""
    try:
        rows = read_predictions(root, v)
    except (OSError, ValueError) as e:
        return e
    return {s: [p for p in rows if p.get("set") == s] for s in dict.fromkeys(p.get("set") for p in rows)}


def _format_failures(rows: list) -> tuple[int, int]:
    return sum(p.get("extracted") is None for p in rows), len(rows)


def answer_blockers(cfg, eval_doc: dict, methods) -> list[str]:
    """A trained variant that answers one thing to most questions of a set (a degenerate predictor), or whose answers
    the rules cannot read far more often than the base's (format failures above the base's by more than
    eval.format_failure_margin), is not a result. Recomputed from the per-question predictions with the current
    config (the flags and rates in eval_default.json are not read back). The base is exempt: its habits are the
    starting point, not the method's outcome."""
    from pipeline.evalkit import answer_distribution
    root, margin = Path(cfg.root), cfg.eval.format_failure_margin
    out, variants = [], eval_doc.get("variants") or {}
    trained = [m for m in methods if (variants.get(m) or {}).get("status") == "scored"]
    base = _predictions_by_set(root, "base") if trained else {}
    if isinstance(base, Exception):
        out.append(f"{PREDICTIONS.format(variant='base')} is missing or unreadable ({type(base).__name__}): the "
                   "trained variants' format failures cannot be held against the base's; re-run "
                   "`python -m pipeline run eval`")
        base = {}
    for v in trained:
        by_set = _predictions_by_set(root, v)
        if isinstance(by_set, Exception):
            out.append(f"{PREDICTIONS.format(variant=v)} is missing or unreadable ({type(by_set).__name__}): the "
                       f"answers of {v} cannot be checked for a degenerate predictor or format failures; re-run "
                       "`python -m pipeline run eval`")
            continue
        for s, ps in by_set.items():
            a = answer_distribution([p.get("extracted") for p in ps], [p.get("gold") for p in ps],
                                    cfg.eval.degenerate_share)
            if a["degenerate"]:
                out.append(f"variant {v} is a degenerate predictor on {s}: it answers {a['top_answer']!r} to "
                           f"{a['top_share']:.0%} of the questions while the gold's largest share is "
                           f"{a['gold_top_share']:.0%} (eval.degenerate_share {a['threshold']:.0%}; answer "
                           "distributions in reports/eval_default.md): retrain it before writing")
            (fv, nv), (fb, nb) = _format_failures(ps), _format_failures(base.get(s, []))
            if base and not nb:
                out.append(f"the base has no predictions on {s}: the format failures of {v} there cannot be held "
                           "against the base's; re-run `python -m pipeline run eval`")
            elif nb and fv / nv - fb / nb > margin:
                out.append(f"variant {v} gives no readable answer to {fv / nv:.0%} of {s} ({fv} of {nv}), the base "
                           f"to {fb / nb:.0%} ({fb} of {nb}): more than eval.format_failure_margin {margin:.0%} above "
                           "the base (the format failures in reports/eval_default.md; often an empty or runaway "
                           "answer after too high a learning rate): retrain it before writing")
    return out


def eval_loss_blockers(cfg, registry) -> list[str]:
    """A method with a held-out eval loss (SFT) whose last value is above its first did not learn what generalizes.
    Recomputed from the trainer's own log (trainer_state.json in the final, hashed by the gate's curve check); the
    metrics' eval_loss_curve must match it."""
    import math
    root, out = Path(cfg.root), []
    for m in (m for m in registry.methods if hasattr(getattr(cfg, m), "eval_steps")):   # held-out eval: SFTCfg
        rel = registry[m].evidence(cfg)
        doc = ev.read_json(root / rel)
        if not isinstance(doc, dict) or doc.get("status") != "ok":
            continue   # not trained: strict_pass says why
        state = ev.read_json(root / (doc.get("trainer_state_file") or "-"))
        if not isinstance(state, dict):
            out.append(f"{m}: the trainer's own log {doc.get('trainer_state_file')!r} is missing or unreadable: its "
                       f"held-out eval loss cannot be checked; re-run `python -m pipeline run {m}`")
            continue
        logged = [[e.get("step"), e["eval_loss"]] for e in state.get("log_history", []) if "eval_loss" in e]
        recorded = doc.get("eval_loss_curve")
        if not (isinstance(recorded, list) and len(recorded) == len(logged) and all(
                isinstance(r, list) and len(r) == 2 and r[0] == s and isinstance(r[1], (int, float))
                and math.isclose(r[1], v, rel_tol=1e-6, abs_tol=1e-9) for r, (s, v) in zip(recorded, logged))):
            out.append(f"{rel}: eval_loss_curve does not match the eval losses in the trainer's own log "
                       f"{doc.get('trainer_state_file')}; re-run `python -m pipeline run {m}`")
        elif len(logged) < 2:
            out.append(f"{m} logged {len(logged)} held-out eval loss(es): whether it went down cannot be told; set "
                       f"{m}.eval_steps to at most half of {m}.max_steps")
        elif not logged[-1][1] < logged[0][1]:
            out.append(f"{m}'s held-out eval loss ended at {logged[-1][1]:.4f} (step {logged[-1][0]}), not below where "
                       f"it started, {logged[0][1]:.4f} (step {logged[0][0]}): it overfits its rows or diverged; "
                       "retrain it (a gentler learning rate, more rows) before writing")
    return out


def anchor_blockers(cfg, eval_doc: dict) -> tuple[list[str], dict]:
    """The base-model sanity check (pipeline/anchors.py base_check) against configs/references.yaml: blockers, and
    what was compared for the readiness evidence. Runs on every tier (the smoke tiers are not ready anyway)."""
    from pipeline import anchors
    tol = cfg.readiness.anchor_tolerance_points
    record = {"model": eval_doc.get("model_name"), "tolerance_points": tol, "comparisons": []}
    try:
        refs = anchors.load_references()
    except (OSError, anchors.ReferenceError) as exc:
        return [f"the published anchors cannot be read ({exc}): the base model cannot be checked against them"], record
    blockers, record["comparisons"] = anchors.base_check(eval_doc, refs, tol)
    return blockers, record


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
    blockers += answer_blockers(cfg, eval_doc, registry.methods) + eval_loss_blockers(cfg, registry)
    anchor_problems, anchors = anchor_blockers(cfg, eval_doc)
    blockers += anchor_problems
    present = {a: (root / a).is_file() for a in ARTIFACTS}
    figures = sorted(p.relative_to(root).as_posix() for p in (root / "reports/figures").glob("*.png"))
    missing = [a for a, ok in present.items() if not ok] + ([] if figures else ["reports/figures/*.png"])
    if missing:
        blockers.append(f"missing thesis artifact(s): {', '.join(missing)} (run `python -m pipeline run reports`)")
    from pipeline.provenance import now
    return {"ready_for_writing": not blockers, "blockers": blockers, "tier": cfg.tier, "strict_pass": strict_pass,
            "rehearsal": rehearsal, "eval_full_size": not partial, "artifacts": present, "figures": figures,
            "anchors": anchors, "checked_at": now()}


def readiness_markdown(r: dict) -> str:
    head = "ready for writing" if r["ready_for_writing"] else "NOT ready for writing"
    lines = [f"# Thesis readiness: {head}", "", f"Tier `{r['tier']}`, checked {r['checked_at']}.", ""]
    lines += (["## Blockers", ""] + [f"- {b}" for b in r["blockers"]]) if r["blockers"] else ["No blockers."]
    from pipeline.anchors import verdict_line
    anchors = r.get("anchors") or {}
    lines += ["", f"## The base model against published figures (tolerance {anchors.get('tolerance_points')} points)",
              ""] + ([verdict_line(c) for c in anchors.get("comparisons") or []] or ["- no scored base model"])
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

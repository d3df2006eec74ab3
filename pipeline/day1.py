"""Day-1 helpers for day1_run.sh: the key check, the output root, boolean flags, and the Day-1 summary.

Run: python -m pipeline day1 keys                 which enabled judge flags need a key (never prints it)
     python -m pipeline day1 root | flag NAME     the output root / true|false for a boolean env variable
     python -m pipeline day1 summary STEPS.jsonl [--dry-run]   reports/migration/day1_run_summary.md + .json
Step records (day1_run.sh writes them) are JSON lines: {"name", "status", "rc", "seconds", "log", "note"}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline import evidence as ev
from pipeline.gate import GATE

SUMMARY = "reports/migration/day1_run_summary.json"


def key_report(cfg, has_key: bool) -> list[str]:
    """Warnings for judge flags that are on without an API key (the key itself is never shown)."""
    flags = [("ENABLE_LLM_JUDGE", cfg.judge.enabled), ("ENABLE_LLM_RISK_JUDGE", cfg.judge.risk_enabled),
             ("ENABLE_V2_LLM_FALLBACK", cfg.eval.llm_fallback)]
    if has_key:
        on = [name for name, value in flags if value]
        return [f"OPENAI_API_KEY is configured (endpoint {cfg.judge.base_url or 'the OpenAI default'}); "
                f"enabled: {', '.join(on) or 'no LLM judge'}"]
    lines = ["OPENAI_API_KEY is not set (neither in the environment nor in .env)."]
    lines += [f"warning: {name}=true will fail without a key: set OPENAI_API_KEY in .env or {name}=false"
              for name, value in flags if value]
    return lines


def day1_summary(root: Path, steps: list[dict], dry_run: bool, cfg, config_error: str | None) -> dict:
    """The Day-1 summary from the step records; the gate's verdict is the gate step's exit status."""
    by_name = {s["name"]: s for s in steps}
    gate_step = by_name.get("gpu-complete-check") or {}
    ran_gate = gate_step.get("status") in ("ok", "failed")
    trained = (by_name.get("gpu-run") or {}).get("status") in ("ok", "failed")
    out = {"dry_run": dry_run, "tier": cfg.tier if cfg else None, "root": str(root),
           "config_error": config_error, "steps": steps, "trained": trained, "gate": {"ran": ran_gate},
           "first_fixes": []}
    for s in [s for s in steps if s["status"] == "failed" and s["name"] != "gpu-complete-check"][:3]:
        out["first_fixes"].append(f"step {s['name']} failed (exit {s['rc']}): {_last_line(root / s['log'])} "
                                  f"(log: {s['log']})")
    if ran_gate:
        strict = gate_step["status"] == "ok"
        before = root / ((by_name.get("gpu-run") or {}).get("log") or "-")   # finished before the gate started
        fresh = (root / GATE).is_file() and (not before.is_file()
                                             or (root / GATE).stat().st_mtime >= before.stat().st_mtime)
        gate_doc = ev.read_json(root / GATE) if fresh else {}
        if not fresh:
            out["first_fixes"].append(f"the gate wrote no new {GATE} (did it crash?): read {gate_step['log']}")
        roots = [c for c in gate_doc.get("checks", [])
                 if isinstance(c, dict) and c.get("todo") and not c.get("blocked_by")]
        out["gate"].update(strict_pass=strict, failed=gate_doc.get("failed", []),
                           report=GATE.replace(".json", ".md"))
        out["first_fixes"] += [f"{c['id']}: {c['detail']} -> {c['todo']}" for c in roots[:5]]
        if cfg is not None:
            from pipeline.readiness import thesis_readiness
            r = thesis_readiness(cfg, strict)
            out["thesis_readiness"] = {"ready_for_writing": r["ready_for_writing"], "blockers": r["blockers"]}
    if trained:
        from pipeline import root_hash
        from pipeline.stages import REGISTRY
        out["evidence_root"] = root_hash.of_root(root, REGISTRY)
    if dry_run:
        dry = ev.read_json(root / "reports/migration/dry_run.json") or {}
        out["dry_run_result"] = {"status": dry.get("status", "missing"), "reason": dry.get("reason")}
        if dry.get("status") not in ("dry_run", "ok") and dry.get("reason"):
            out["first_fixes"].append(f"the dry run ({dry.get('status', 'missing')}): {dry['reason']} "
                                      "(reports/migration/dry_run.json)")
        plan = (ev.read_json(root / "reports/migration/gpu_check.json") or {}).get("plan") or {}
        if plan and not plan.get("feasible"):
            out["first_fixes"].append(f"a real run would skip training here: {plan.get('feasible_reason')} "
                                      "(reports/migration/gpu_check.json)")
        out["verdict"] = ("DRY RUN: nothing was trained; the dry run " +
                          ("passed" if (by_name.get("dry-run") or {}).get("status") == "ok" else "did not pass"))
    elif ran_gate:
        out["verdict"] = (f"strict_pass: {str(out['gate']['strict_pass']).lower()}"
                          + ("" if trained else " (nothing was trained)"))
    else:
        out["verdict"] = ("the gate did not run: the run stopped early"
                          + ("" if trained else "; nothing was trained"))
    if config_error:
        out["first_fixes"].insert(0, f"config error: {config_error}")
    if cfg is not None and not dry_run:
        out["prediction"] = predicted_vs_actual(root, cfg)
    return out


def predicted_vs_actual(root: Path, cfg) -> dict | None:
    """The preflight's predicted seconds per stage against each stage's measured duration_s (ok evidence only),
    and in total over the stages that have both; None without an ok preflight."""
    import os

    from pipeline import preflight_kit as K
    from pipeline.stages import REGISTRY
    doc = ev.read_json(root / REGISTRY["preflight"].evidence(cfg))
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return None
    actual = {}
    for name in K.predictions(doc):
        got = ev.read_json(root / REGISTRY[name].evidence(cfg)) if name in REGISTRY else None
        actual[name] = got.get("duration_s") if isinstance(got, dict) and got.get("status") == "ok" else None
    return {"evidence": REGISTRY["preflight"].evidence(cfg), "rows": K.versus(doc, actual),
            "preflight_s": doc.get("duration_s"), "load_average": [round(x, 2) for x in os.getloadavg()]}


def _last_line(log: Path) -> str:
    """The last non-empty line of a step log, without terminal colour codes: usually the reason."""
    import re
    try:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", x).strip() for x in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    engine_verdicts = [x for x in lines if x.startswith(("failed ", "blocked ", "✗ "))]   # the engine's lines
    if engine_verdicts:
        return "; ".join(engine_verdicts[-3:])
    noise = ("make: ***", "make[", *"│┃└┘┌┐┏┓┗┛━─╇┡╭╰")   # make's error line, rich's borders
    return next((x for x in reversed(lines) if x and not x.startswith(noise)), "empty log")


def summary_markdown(s: dict) -> str:
    lines = ["# Day-1 run summary", "", f"**{s['verdict']}**", "",
             f"Tier `{s['tier'] or 'unknown (config error)'}`, output root `{s['root']}`.", "",
             "| step | status | seconds | log | note |", "|---|---|---|---|---|"]
    lines += [f"| {x['name']} | {x['status']} | {x['seconds']} | {x['log']} | {x['note']} |"
              for x in s["steps"]]
    if s.get("evidence_root"):
        r = s["evidence_root"]
        lines += ["", f"Evidence root sha256 `{r['sha256']}` over {r['files']} files ({r['scope']}): the hash the "
                  "thesis material quotes; `make export` prints it for the archive, `make verify-export` recomputes it."]
    if s["first_fixes"]:
        lines += ["", "## First things to fix", ""] + [f"{i}. {f}" for i, f in enumerate(s["first_fixes"], 1)]
    if s.get("prediction"):
        p = s["prediction"]
        lines += ["", "## Predicted vs actual (preflight)", "",
                  f"Predicted by `{p['evidence']}` (the preflight itself took {p['preflight_s']} s); actual: each "
                  f"stage's `duration_s`. Load average (1, 5, 15 min) when this summary was written: "
                  f"{', '.join(map(str, p['load_average']))}.", "",
                  "| stage | predicted s | actual s | actual / predicted |", "|---|---|---|---|"]
        lines += [f"| {r['stage']} | {r['predicted_s']} | {'-' if r['actual_s'] is None else r['actual_s']} | "
                  f"{'-' if r['ratio'] is None else r['ratio']} |" for r in p["rows"]]
    if "thesis_readiness" in s:
        r = s["thesis_readiness"]
        lines += ["", f"## Thesis readiness: ready_for_writing {str(r['ready_for_writing']).lower()}", ""]
        lines += [f"- {b}" for b in r["blockers"]]
    return "\n".join(lines) + "\n"


def read_steps(path: Path) -> list[dict]:
    """Step records written by day1_run.sh, one JSON object per line: name, status, rc (null when the step
    did not run), seconds, log (file name under reports/logs/, "" when none), note."""
    steps = []
    for line in (path.read_text(encoding="utf-8") if path.is_file() else "").splitlines():
        if line.strip():
            r = json.loads(line)
            rc = r.get("rc")
            log = f"reports/logs/{r['log']}" if r.get("log") else ""
            steps.append({"name": r["name"], "status": r["status"], "rc": rc if isinstance(rc, int) else None,
                          "seconds": int(r.get("seconds") or 0), "log": log, "note": r.get("note") or ""})
    return steps


def cli(argv: list[str] | None = None) -> int:
    from pipeline.settings import REPO, ConfigError, env_flag, environment, load_config, secret
    parser = argparse.ArgumentParser(prog="python -m pipeline day1")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="the strict gate (same as python -m pipeline check)")
    sub.add_parser("keys", help="exit 0 with a key, 3 without one, 2 on a config error")
    sub.add_parser("root", help="print the output root")
    p_flag = sub.add_parser("flag", help="print true/false for a boolean environment variable")
    p_flag.add_argument("name")
    p_sum = sub.add_parser("summary", help="write reports/migration/day1_run_summary.md + .json")
    p_sum.add_argument("steps", type=Path)
    p_sum.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "flag":
            print(str(env_flag(args.name)).lower())
            return 0
        cfg, error = load_config(), None
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        if args.cmd not in ("summary", "root"):
            return 2
        cfg, error = None, str(exc)
    root = Path(cfg.root) if cfg else Path(environment().get("PIPELINE_ROOT") or REPO).expanduser().resolve()
    if args.cmd == "root":
        print(root)
        return 0
    if args.cmd == "keys":
        has_key = secret("OPENAI_API_KEY") is not None
        print("\n".join(key_report(cfg, has_key)))
        return 0 if has_key else 3
    if args.cmd == "summary":
        s = day1_summary(root, read_steps(args.steps), args.dry_run, cfg, error)
        ev.atomic_write_json(root / SUMMARY, s)
        ev.atomic_write_text(root / SUMMARY.replace(".json", ".md"), summary_markdown(s))
        print(f"{s['verdict']}\nsummary: {root / SUMMARY.replace('.json', '.md')}")
        return 0
    from rich.console import Console
    from pipeline.gate import main
    return main(cfg, Console(highlight=False))



if __name__ == "__main__":
    sys.exit(cli())

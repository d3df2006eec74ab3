"""Benchmark: the preflight's prediction against the run it predicted (part of `make bench`; no timed assertion).

Run: python -m scripts.bench --only preflight                 (demo tier: the whole demo Day-1 per repetition)
     BENCH_REPS=3 python -m scripts.bench --only preflight    (three fresh roots: the spread of every ratio)
     python -m scripts.bench --quick --only preflight         (tiny tier, quick overrides: the smoke test)
Each repetition: `python -m pipeline run all preflight.enabled=true` in a fresh PIPELINE_ROOT (the demo model's
cache shared between them), then per predicted stage (training stages, eval, judge) the preflight's predicted_s
against the stage's measured duration_s, and the total over the stages that have both (preflight_kit.versus).
The load average is recorded before and after: on a shared machine the ratios mean little above ~1 per core.
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path


def bench_preflight(work: Path, reps: int, quick: bool, child_env, run_pipeline, quick_overrides: list[str]) -> dict:
    from pipeline import evidence
    from pipeline import preflight_kit as K
    from pipeline.settings import load_config
    from pipeline.stages import REGISTRY
    tier = "tiny" if quick else "demo"
    overrides = ["preflight.enabled=true", *(quick_overrides if quick else [])]
    runs = []
    for i in range(reps):
        root = work / f"preflight-{i}"
        env = child_env(root, MODEL_TIER=tier, MEDLLM_CACHE=str(work / "model-cache"))
        load_before = os.getloadavg()
        done = run_pipeline(["run", "all", *overrides], env, work / "logs" / f"preflight-{i}.log")
        cfg = load_config(env=env, overrides=overrides)
        doc = evidence.read_json(root / REGISTRY["preflight"].evidence(cfg)) or {}
        actual = {}
        for name in K.predictions(doc):
            got = evidence.read_json(root / REGISTRY[name].evidence(cfg)) or {}
            actual[name] = got.get("duration_s") if got.get("status") == "ok" else None
        # the preflight's own cost: its duration less building the demo base, which the first stage to need the
        # model pays once per cache whether a preflight runs or not
        own = (doc.get("duration_s") or 0) - (doc.get("base_build_s") or 0) if doc.get("duration_s") else None
        runs.append({"rc": done["rc"], "wall_s": done["wall_s"], "preflight_s": own,
                     "base_build_s": doc.get("base_build_s"),
                     "rows": K.versus(doc, actual), "load_average_before": [round(x, 2) for x in load_before],
                     "load_average_after": [round(x, 2) for x in os.getloadavg()]})
    ratios: dict[str, list[float]] = {}
    for r in runs:
        for row in r["rows"]:
            if row["ratio"] is not None:
                ratios.setdefault(row["stage"], []).append(row["ratio"])
    return {"setup": f"python -m pipeline run all {' '.join(overrides)} on the {tier} tier in a fresh root, {reps} "
                     "time(s); actual / predicted per stage from duration_s vs the preflight's predicted_s",
            "tier": tier, "runs": runs,
            "ratio_actual_to_predicted": {k: {"median": round(statistics.median(v), 3), "min": min(v), "max": max(v),
                                              "n": len(v)} for k, v in ratios.items()},
            "preflight_s": [round(r["preflight_s"], 1) for r in runs if r["preflight_s"]],
            "preflight_share_of_run": [round(r["preflight_s"] / r["wall_s"], 3) for r in runs
                                       if r["preflight_s"] and r["wall_s"]]}


def rows(p: dict) -> list[tuple[str, str, str]]:
    out = [("preflight", f"{k}: actual / predicted (median, min-max, n)",
            f"{v['median']} ({v['min']}-{v['max']}, {v['n']})") for k, v in p["ratio_actual_to_predicted"].items()]
    loads = [r["load_average_before"][0] for r in p["runs"]]
    return out + [("preflight", "preflight s (less the base build) / share of the whole run",
                   f"{', '.join(map(str, p['preflight_s']))} / {', '.join(map(str, p['preflight_share_of_run']))}"),
                  ("preflight", "exit codes; 1-min load average before each run",
                   f"{[r['rc'] for r in p['runs']]}; {loads}")]

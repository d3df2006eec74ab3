"""The strict completion gate: a loop over the registry's stages calling each one's `checks`, plus the chain
checks; strict_pass is their conjunction. Recomputed from the files on disk every time: no `strict_pass` or
`passed` is ever read back from an earlier verdict.
Run: python -m pipeline check   (make gpu-complete-check; exit 0 iff strict_pass)

A stage module exports `checks(g, doc) -> list[core.Check]` beside its `run`; a training stage without its own
gets pipeline.training_checks' (the one set every method shares). Advice for a failed check is keyed by its code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline import evidence as ev
from pipeline.advice import ADVICE, advice
from pipeline.core import Check, Registry, Stage

__all__ = ["ADVICE", "GATE", "Gate", "advice", "check_stage", "evaluate", "main", "probe_plan"]

GATE = "reports/migration/gpu_completion_check.json"
GPU_CHECK = "reports/migration/gpu_check.json"


def _registry(registry: Registry | None, cfg=None) -> Registry:
    """The registry (the real one by default), with cfg the seed replicates it asks for (pipeline/seeds.py)."""
    from pipeline import seeds
    if registry is None:
        from pipeline.stages import REGISTRY as registry
    return registry if cfg is None else seeds.expand(registry, cfg)


@dataclass
class Gate:
    """What a stage's checks see: the config, the registry, the plan the run executed, the shared loaded-base
    probe (variants.Variants, one base load for every checkpoint probe) and the stage being checked."""
    cfg: object
    registry: Registry
    plan: dict
    vs: object = None
    stage: Stage | None = None

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    @property
    def rel(self) -> str:
        return self.stage.evidence(self.cfg) if self.stage else "reports/"

    def of(self, stage: Stage) -> "Gate":
        return dataclasses.replace(self, stage=stage)

    def doc(self, name: str):
        """A stage's evidence as it is on disk (None when missing or not JSON)."""
        return ev.read_json(self.root / self.registry[name].evidence(self.cfg))

    def result(self, what: str, problems: list[str], ok_detail: str, evidence: str | None = None,
               code: str | None = None, blocked_by: str | None = None) -> Check:
        prefix = self.stage.name if self.stage else "chain"
        return Check(f"{prefix}.{what}", not problems, "; ".join(problems) if problems else ok_detail,
                     evidence or self.rel, code if problems else None, blocked_by)

    def blocked(self, what: str, by: str, evidence: str | None = None) -> Check:
        by_id = f"{self.stage.name}.{by}"
        return self.result(what, [f"not checked: {by_id} failed"], "", evidence, blocked_by=by_id)


def probe_plan(root: Path) -> dict:
    """The plan the run executed (gpu_check's run_plan in a rehearsal, else its plan) where it is a CUDA plan or
    a rehearsal's CPU one (the tier's precision and quantization), else the CPU plan."""
    from pipeline.training_checks import CPU_PLAN
    check = ev.read_json(Path(root) / GPU_CHECK) or {}
    plan = check.get("run_plan") or check.get("plan") or {}
    if plan.get("rehearsal"):
        return {k: plan.get(k) for k in (*CPU_PLAN, "rehearsal")}
    if plan.get("device") == "cuda":
        return {k: plan.get(k) for k in CPU_PLAN}
    return dict(CPU_PLAN)


def checks_of(stage: Stage):
    """The stage's checks function: its module's `checks`, or for any training method the shared set."""
    if stage.checks is None and stage.method is not None:
        from pipeline import training_checks
        return training_checks.checks
    return stage.checks


def row(c) -> dict:
    """A check as the gate writes it: id, passed, detail, evidence (+ code, blocked_by when set)."""
    c = c if isinstance(c, dict) else dataclasses.asdict(c)
    out = {"id": c["id"], "passed": bool(c["passed"]), "detail": c["detail"], "evidence": c["evidence"]}
    out.update({k: c[k] for k in ("code", "blocked_by") if c.get(k)})
    return out


def chain_checks(g: Gate) -> list[Check]:
    """chain.<what>: no incomplete markers, every other stage finished, every stage fresh."""
    from pipeline.engine import fingerprint, status_of
    g = g.of(None)
    root = g.root
    markers = sorted(p.relative_to(root).as_posix() for p in (root / "reports/.incomplete").glob("*")
                     if p.is_file())
    out = [g.result("no_incomplete", [f"a stage was interrupted and left its marker: {', '.join(markers)}"]
                    if markers else [], "no stage left an incomplete marker", "reports/.incomplete/")]
    found: dict[str, list[str]] = {"stale": [], "tampered": []}
    unfinished = []
    for stage in (s for s in g.registry.stages if s.in_all):
        state = status_of(stage, g.cfg, fingerprint(stage, g.cfg, g.registry)[0])
        found.get(state, []).append(stage.name)
        if not stage.training and state not in ("ok", "skipped", "stale", "tampered"):
            unfinished.append(f"{stage.name} is {state} ({stage.evidence(g.cfg)})")
    out.append(g.result("stages", unfinished, "every other stage of `make gpu-run` finished"))
    bad = [f"{', '.join(names)}: {why}" for names, why in (
        (found["stale"], "stale (config, data or upstream evidence changed since they ran)"),
        (found["tampered"], "tampered (their recorded outputs changed on disk)")) if names]
    out.append(g.result("fresh", bad, "every stage's evidence matches the current config, inputs, upstream and "
                        "outputs"))
    return out


def stage_rows(g: Gate, stage: Stage) -> list[dict]:
    fn = checks_of(stage)
    return [row(c) for c in (fn(g.of(stage), g.doc(stage.name)) if fn else [])]


def check_stage(cfg, name: str, registry: Registry | None = None) -> list[dict]:
    """One stage's checks alone (scripts/soak.py), with their own probe."""
    from pipeline.variants import Variants
    registry, plan = _registry(registry, cfg), probe_plan(Path(cfg.root))
    with Variants(None, plan) as vs:
        return stage_rows(Gate(cfg, registry, plan, vs), registry[name])


def evaluate(cfg, registry: Registry | None = None) -> dict:
    """Every check, recomputed from the files; strict_pass is their conjunction."""
    from pipeline.variants import Variants
    registry = _registry(registry, cfg)
    plan = probe_plan(Path(cfg.root))
    rows = []
    with Variants(None, plan) as vs:   # every probe on one base model load
        g = Gate(cfg, registry, plan, vs)
        for stage in registry.stages:
            rows += stage_rows(g, stage)
        memory = vs.memory()
    rows += [row(c) for c in chain_checks(g)]
    failing = {c["id"].split(".")[0] for c in rows if not c["passed"]}
    for c in rows:
        if not c["passed"]:
            name = c["id"].split(".")[0]
            above = registry.upstream(name) if name in registry else []
            c["todo"] = advice(cfg, c, [s.name for s in registry.stages if s.name in above and s.name in failing])
    failed = [c["id"] for c in rows if not c["passed"]]
    from pipeline.provenance import git_commit, now
    return {"strict_pass": not failed, "failed": failed, "tier": cfg.tier, "root": cfg.root, "checked_at": now(),
            "git_commit": git_commit(), "probe_plan": plan, **memory, "checks": rows}


def main(cfg, console) -> int:
    """`python -m pipeline check`: run every check, write both verdicts, exit 0 iff strict_pass."""
    from rich.markup import escape
    from rich.table import Table

    from pipeline import readiness as R
    root = Path(cfg.root)
    gate = evaluate(cfg)
    ready = R.thesis_readiness(cfg, gate["strict_pass"])
    ev.atomic_write_json(root / GATE, gate)
    ev.atomic_write_text(root / GATE.replace(".json", ".md"), R.gate_markdown(gate))
    ev.atomic_write_json(root / R.READINESS, ready)
    ev.atomic_write_text(root / R.READINESS.replace(".json", ".md"), R.readiness_markdown(ready))
    table = Table(title=f"completion check (tier {cfg.tier})", show_lines=False)
    for col in ("check", "", "detail"):
        table.add_column(col, overflow="fold")
    for c in sorted(gate["checks"], key=_passed):
        if not c.get("blocked_by"):
            table.add_row(c["id"], "[green]pass[/]" if c["passed"] else "[red]FAIL[/]", escape(c["detail"]))
    console.print(table)
    blocked = [c["id"] for c in gate["checks"] if c.get("blocked_by")]
    if blocked:
        console.print(f"[red]not checked[/] (blocked by a failure above): {', '.join(blocked)}")
    colour = "green" if gate["strict_pass"] else "red"
    console.print(f"[{colour}]strict_pass: {str(gate['strict_pass']).lower()}[/] ({len(gate['failed'])} failing)"
                  f"  -> {GATE}")
    console.print(f"ready_for_writing: {str(ready['ready_for_writing']).lower()}"
                  + "".join(f"\n  - {escape(b)}" for b in ready["blockers"]) + f"\n  -> {R.READINESS}")
    return 0 if gate["strict_pass"] else 1


def _passed(c: dict) -> bool:
    return c["passed"]

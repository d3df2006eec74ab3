"""Every field of every evidence schema is accounted for (issue 14 §2): a field a user would quote is either
recomputed by a gate check (RECOMPUTED: the check id, which a test exercises by editing it) or inside the evidence
root hash that the gate's `reports.evidence_root` checks and `make export` records (every field of the methods',
eval's and judge's evidence, and every final's file); every other stage's field says why it is not a quoted
result (OUTSIDE). A new schema field without a decision fails here.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_evidence_coverage.py
"""
from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest

from pipeline import evidence as ev
from pipeline import root_hash
from pipeline.stages import REGISTRY

SCHEMAS = Path(__file__).resolve().parents[2] / "pipeline" / "schemas"
TESTS = Path(__file__).resolve().parents[1]

# field -> the gate check that recomputes it ("{m}": every training method)
RECOMPUTED = {
    "{m}": {"checkpoint_files": "checkpoint", "loss_curve": "curve", "global_step": "steps",
            "planned_max_steps": "steps", "precision": "invariants", "memory": "invariants", "batch": "invariants",
            "start_checkpoint": "from_sft", "reference": "reference"},
    "eval": {"results": "numbers", "paired": "numbers", "min_detectable_difference": "numbers",
             "multiple_comparisons": "numbers", "sets": "coverage", "variants": "coverage"},
    "judge": {"pairwise": "pairwise", "risk": "risk"},
    "reports": {"evidence_root": "evidence_root"},
}
BOOKKEEPING = "the engine's own record (status, fingerprint, times, hashes of outputs): re-derived on every run"
OUTSIDE = {   # stages whose evidence is outside the root hash: why none of their fields is a quoted result
    "_common": dict.fromkeys(["config_hash", "duration_s", "fingerprint", "finished_at", "git_commit", "inputs",
                              "model_tier", "outputs", "reason", "skipped", "stage", "started_at", "status",
                              "versions"], BOOKKEEPING),
    "gpu_bootstrap": "facts of this machine's environment (imports, folders, disk), re-checked by every "
                     "`make gpu-bootstrap`; no result is computed from them",
    "gpu_check": "the hardware probe and the plan: machine facts, re-probed on another boot (Stage.machine); the "
                 "thesis record names the hardware, it quotes no figure from it",
    "dry_run": "the dry run's validation record, rewritten by each `make dry-run`; no figure is quoted from it",
    "gpu_selftest": "a few trainer steps on the GPU with a stand-in model: a machine check, not a result",
    "preflight": "predictions and the budget decision, labelled as predictions wherever shown; the engine re-decides "
                 "the budget from BUDGET on every run",
    "export_merged": "merge parity of the take-home folders: `make verify-export` checks each merged folder "
                     "against this record; the thesis quotes the adapters' results, not the merged folders'",
    "reports": "the manifest of the report files, whose hashes the engine checks (a changed report is tampered)",
}


def _props(schema: dict) -> set[str]:
    out = set(schema.get("properties", {}))
    for part in [schema, *schema.get("allOf", [])]:
        out |= set(part.get("properties", {}))
        for branch in ("then", "else"):
            out |= set(part.get(branch, {}).get("properties", {}))
    return out


def _schema(stage) -> dict:
    return json.loads((SCHEMAS / f"{stage.schema or stage.name}.schema.json").read_text())


def _in_root(stage) -> bool:
    return any(fnmatch(stage.evidence_path.replace("{slug}", "tiny"), p) for p in root_hash.patterns(REGISTRY))


def test_every_schema_field_is_recomputed_inside_the_root_hash_or_says_why_not():
    undecided = []
    for stage in REGISTRY.stages:
        fields = _props(_schema(stage)) | (_props(json.loads((SCHEMAS / "_training.schema.json").read_text()))
                                           if stage.method else set())
        if _in_root(stage):
            continue   # every field: inside the root hash (the next test), the quoted ones recomputed too
        if stage.name not in OUTSIDE:
            undecided.append(f"{stage.name}: all of {sorted(fields)}")
    assert undecided == [], f"evidence outside the root hash without a reason (add it to OUTSIDE): {undecided}"


def test_the_results_are_inside_the_root_hash():
    inside = {s.name for s in REGISTRY.stages if _in_root(s)}
    assert inside == {*REGISTRY.methods, "eval", "judge"}


@pytest.mark.parametrize("stage", [s.name for s in REGISTRY.stages if _in_root(s)])
def test_editing_any_field_of_a_result_changes_the_root_the_gate_checks(stage, tmp_path):
    """Each schema field of the stage's evidence, edited, gives another root hash, so `reports.evidence_root`
    fails (the check itself: tests/unit/test_evidence_root.py and the tamper table of test_checker)."""
    s = REGISTRY[stage]
    fields = sorted(_props(_schema(s)) | _props(json.loads((SCHEMAS / "_common.schema.json").read_text()))
                    | (_props(json.loads((SCHEMAS / "_training.schema.json").read_text())) if s.method else set()))
    path = tmp_path / s.evidence_path.replace("{slug}", "tiny")
    path.parent.mkdir(parents=True)
    doc = {f: 1 for f in fields}
    ev.atomic_write_json(path, doc)
    quoted = root_hash.of_root(tmp_path, REGISTRY)
    assert quoted["files"] == 1
    for f in fields:
        ev.atomic_write_json(path, {**doc, f: 2})
        assert root_hash.problems(tmp_path, REGISTRY, quoted), f"{stage}.{f} is outside the root hash"


def test_each_recomputing_check_is_exercised_by_a_test_that_edits_it():
    text = "\n".join(p.read_text(encoding="utf-8") for p in TESTS.rglob("test_*.py"))
    missing = []
    for owner, fields in RECOMPUTED.items():
        stages = REGISTRY.methods if owner == "{m}" else (owner,)
        for check in set(fields.values()):
            if not any(f'"{st}.{check}"' in text for st in stages):
                missing.append(f"{owner}.{check}")
    assert missing == [], f"no test edits evidence to fail these checks: {missing}"


def test_the_recomputed_fields_are_fields_of_their_schemas():
    training = _props(json.loads((SCHEMAS / "_training.schema.json").read_text()))
    for owner, fields in RECOMPUTED.items():
        if owner == "{m}":
            have = training | {f for m in REGISTRY.methods for f in _props(_schema(REGISTRY[m]))}
        else:
            have = _props(_schema(REGISTRY[owner]))
        assert set(fields) <= have, (owner, sorted(set(fields) - have))

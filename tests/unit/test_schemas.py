"""Evidence schemas: every registered stage has one (own or common), and the common fields are enforced.

Run: .venv/bin/python -m pytest -q tests/unit/test_schemas.py
"""
from __future__ import annotations

import copy
import json
from importlib import resources

import jsonschema
import pytest

from pipeline import evidence as ev
from pipeline.stages import REGISTRY

NAMES = [s.name for s in REGISTRY.stages]


def _replicate_schemas() -> set:
    """The schemas the stages SEEDS adds name (eval@seed<N>: seed_eval; pipeline/seeds.py)."""
    from pipeline import seeds
    from pipeline.settings import Config
    cfg = Config(tier="tiny")
    cfg.runtime.seeds = [1]
    return {s.schema or s.name for s in seeds.expand(REGISTRY, cfg).stages if s.replicate}


IN_USE = set(NAMES) | _replicate_schemas()
HEX = "0" * 63 + "a"
SCHEMA_FILES = sorted(p.name for p in resources.files(ev.SCHEMA_PKG).iterdir() if p.name.endswith(".schema.json"))


def common_evidence(status: str = "failed", **extra) -> dict:
    """What the engine writes for a skip or a crash: the common fields only."""
    doc = {"stage": "x", "status": status, "skipped": status == "skipped", "reason": "no GPU here",
           "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:00:01+00:00", "duration_s": 1.0,
           "git_commit": "abc123", "config_hash": HEX, "fingerprint": HEX,
           "versions": {"python": "3.12.0", "trl": None},
           "inputs": {"data/x.jsonl": HEX}, "outputs": {"reports/x.md": HEX}, "model_tier": "tiny"}
    return {**doc, **extra}


def test_the_schema_folder_is_found_and_not_empty():
    assert "_common.schema.json" in SCHEMA_FILES and len(SCHEMA_FILES) >= 2


def _schema(name: str) -> dict:
    return json.loads(resources.files(ev.SCHEMA_PKG).joinpath(name).read_text())


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_every_schema_file_is_valid_json_schema_and_is_used(name):
    """<stage>.schema.json names a registered stage; _<part>.schema.json is common or extended by a stage."""
    jsonschema.Draft202012Validator.check_schema(_schema(name))
    stem = name.removesuffix(".schema.json")
    if stem == "_common":
        return
    if stem.startswith("_"):
        users = [n for n in SCHEMA_FILES if _schema(n).get("extends") == stem]
        assert users, f"{name} is extended by no stage schema"
    else:
        assert stem in IN_USE, f"{name} belongs to no stage in pipeline/stages/__init__.py (or a seed replicate)"


@pytest.mark.parametrize("stage", NAMES)
def test_every_stage_gets_a_schema_that_includes_the_common_fields(stage):
    schema = ev.load_schema(stage)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert ev.validate(stage, {"stage": stage}), "a document with only `stage` must not validate"


@pytest.mark.parametrize("status", ["skipped", "failed"])
@pytest.mark.parametrize("stage", NAMES)
def test_the_engines_own_skip_and_failure_evidence_validates_for_every_stage(stage, status):
    """A crash or a skip carries only the common fields; a stage schema must not demand more then."""
    assert ev.validate(stage, common_evidence(status, stage=stage)) == []


def test_valid_common_evidence_passes():
    assert ev.validate("no_such_stage", common_evidence("ok", reason=None)) == []
    assert ev.validate("no_such_stage", common_evidence("dry_run", reason="dry run: nothing trained")) == []


def _without(key):
    doc = common_evidence("skipped")
    del doc[key]
    return doc


INVALID = {
    "status done": (common_evidence(status="done"), "status"),
    "ok but skipped": (common_evidence("ok", skipped=True, reason=None), "skipped"),
    "skipped but skipped false": (common_evidence("skipped", skipped=False), "skipped"),
    "skipped without reason": (_without("reason"), "reason"),
    "skipped with empty reason": (common_evidence("skipped", reason=""), "reason"),
    "failed with null reason": (common_evidence("failed", reason=None), "reason"),
    "non-hex hash in outputs": (common_evidence(outputs={"reports/x.md": "not-a-sha256"}), "outputs"),
    "short hash in inputs": (common_evidence(inputs={"data/x.jsonl": "abc"}), "inputs"),
    "unknown tier": (common_evidence(model_tier="70b"), "model_tier"),
    "missing fingerprint": (_without("fingerprint"), "fingerprint"),
    "negative duration": (common_evidence(duration_s=-1), "duration_s"),
}


@pytest.mark.parametrize("stage", ["no_such_stage", *NAMES])
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_common_evidence_fails_for_every_stage(case, stage):
    doc, field = INVALID[case]
    errors = ev.validate(stage, {**copy.deepcopy(doc), "stage": stage})
    assert errors, f"{case} validated for {stage}"
    assert any(field in e for e in errors), errors

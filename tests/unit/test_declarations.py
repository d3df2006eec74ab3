"""A stage receives exactly what it declares (issue 11): every declared config key is in the fingerprint, a read
outside the declaration fails the stage, every config key is read by some stage or by the engine/loader, and
the files a stage quotes (configs/references.yaml) make it stale when edited.

Run: .venv/bin/python -m pytest -q tests/unit/test_declarations.py
"""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
from rich.console import Console

from pipeline import core, engine, reporting, settings
from pipeline.settings import load_config
from pipeline.stages import REGISTRY

# Keys no stage reads, each with the reason it still exists. Anything else unread is a dead knob.
NOT_READ_BY_STAGES = {
    "tier": "in every fingerprint (core.ALWAYS)",
    "root": "where, not what: the output root",
    "cache_dir": "where, not what: the model cache",
    "runtime.allow_skip_training": "the engine: a skipped training stage becomes a failure",
    "runtime.dry_run": "the engine's dry-run mode",
    "runtime.rehearsal_steps": "load_config scales the step counts with it; the stages read those",
    "runtime.rehearsal_eval_samples": "load_config caps the sample sizes with it; the stages read those",
    "readiness.anchor_tolerance_points": "the gate's readiness check (pipeline/readiness.py); reports reads '*'",
}


def _changed(value):
    """A different value of the same kind (only hashed, never validated)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return value + ["changed"]
    if isinstance(value, dict):
        return {**value, "changed": 1}
    return "changed"


def _fields(key: str, cfg) -> list[str]:
    """A declared key as the dotted fields it covers."""
    if key == "*":
        return []
    section, _, sub = key.partition(".")
    if sub or not dataclasses.is_dataclass(getattr(cfg, section)):
        return [key]
    return [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section))]


def _with(cfg, dotted: str):
    out = copy.deepcopy(cfg)
    section, _, sub = dotted.partition(".")
    if sub:
        obj = getattr(out, section)
        object.__setattr__(obj, sub, _changed(getattr(obj, sub)))
    else:
        setattr(out, section, _changed(getattr(out, section)))
    return out


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_every_declared_key_is_in_the_fingerprint(tiny_env):
    """For every stage and every config field it declares: changing the field changes the fingerprint."""
    cfg = load_config()
    missing, n = [], 0
    for stage in REGISTRY.stages:
        before, _ = engine.fingerprint(stage, cfg, REGISTRY)
        for key in (f for k in stage.reads for f in _fields(k, cfg)):
            n += 1
            if engine.fingerprint(stage, _with(cfg, key), REGISTRY)[0] == before:
                missing.append(f"{stage.name}:{key}")
    assert n > 150 and missing == [], f"declared but not in the fingerprint: {missing}"


def test_every_config_key_is_read_by_a_stage_or_has_a_reason():
    cfg = load_config(tier="tiny")
    read = {f for s in REGISTRY.stages for k in s.reads + s.untracked if k != "*" for f in _fields(k, cfg)}
    unread = sorted(k for k in settings._known_keys() if k not in read and k not in NOT_READ_BY_STAGES)
    assert unread == [], f"config keys no stage reads (dead knobs: remove them or give the reason): {unread}"


def test_a_training_seed_given_as_an_argument_retrains(tiny_env):
    """`run all runtime.seed=7` left SFT "up to date" although the seed goes to TrainingArguments."""
    a = engine.fingerprint(REGISTRY["sft"], load_config(), REGISTRY)[0]
    b = engine.fingerprint(REGISTRY["sft"], load_config(overrides=["runtime.seed=7"]), REGISTRY)[0]
    assert a != b


def test_keys_a_stage_does_not_read_leave_it_up_to_date(tiny_env):
    a = engine.fingerprint(REGISTRY["sft"], load_config(), REGISTRY)[0]
    b = engine.fingerprint(REGISTRY["sft"], load_config(overrides=["judge.model=other", "eval.batch_size=3"]),
                           REGISTRY)[0]
    assert a == b


def test_an_edited_references_file_makes_the_reports_stale(tiny_env, tmp_path, monkeypatch):
    refs = tmp_path / "references.yaml"
    refs.write_text(reporting.REFERENCES.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(reporting, "REFERENCES", refs)
    cfg = load_config()
    before = engine.fingerprint(REGISTRY["reports"], cfg, REGISTRY)[0]
    refs.write_text(refs.read_text(encoding="utf-8").replace("57.", "58.", 1) + "\n# edited\n", encoding="utf-8")
    assert engine.fingerprint(REGISTRY["reports"], cfg, REGISTRY)[0] != before


# --- the scoped view, on a fake registry ------------------------------------------------------------
def _fake(run, **decl) -> core.Registry:
    return core.Registry([core.Stage("probe_a", "reports/fake/probe_a.json", run=run, **decl)])


def test_reading_an_undeclared_key_fails_the_stage_naming_key_and_fix(tiny_env):
    def run(ctx):
        return {"lr": ctx.cfg.sft.learning_rate, "seed": ctx.cfg.runtime.seed}
    reg = _fake(run, reads=("sft",))
    out = io.StringIO()
    assert engine.run(["probe_a"], load_config(), Console(file=out, width=300), reg) == 1
    doc = engine.ev.read_json(tiny_env / "reports/fake/probe_a.json")
    assert doc["status"] == "failed"
    assert "runtime.seed" in doc["reason"] and "pipeline/stages/probe_a.py" in doc["reason"]


def test_reads_are_recorded_in_the_evidence_and_writes_are_refused(tiny_env):
    def run(ctx):
        assert ctx.cfg.sft.max_steps > 0 and ctx.cfg.tier == "tiny"
        with pytest.raises(core.StageFailed, match="change"):
            ctx.cfg.sft.max_steps = 1
        return {}
    reg = _fake(run, reads=("sft.max_steps",))
    assert engine.run(["probe_a"], load_config(), Console(file=io.StringIO()), reg) == 0
    doc = engine.ev.read_json(tiny_env / "reports/fake/probe_a.json")
    assert doc["config_read"] == ["sft.max_steps"]


def test_a_data_file_outside_the_declared_inputs_is_refused(tiny_env):
    def run(ctx):
        ctx.cfg.data_path(ctx.cfg.data.medqa_path)
        return {}
    reg = _fake(run, reads=("data.medqa_path", "data.sft_path"),
                inputs=lambda cfg: [cfg.data_path(cfg.data.sft_path)])
    assert engine.run(["probe_a"], load_config(), Console(file=io.StringIO()), reg) == 1
    doc = engine.ev.read_json(tiny_env / "reports/fake/probe_a.json")
    assert "data file" in doc["reason"] and "medqa" in doc["reason"]


def test_evidence_of_a_stage_not_needed_is_refused(tiny_env):
    def run(ctx):
        ctx.evidence("other")
        return {}
    reg = core.Registry([core.Stage("other", "reports/fake/other.json", run=lambda ctx: {}),
                         core.Stage("probe_a", "reports/fake/probe_a.json", run=run)])
    assert engine.run(["probe_a"], load_config(), Console(file=io.StringIO()), reg) == 1
    assert "needs=" in engine.ev.read_json(tiny_env / "reports/fake/probe_a.json")["reason"]


def test_the_registry_expands_method_keys_and_needs():
    reg = core.Registry([
        core.Stage("m1", "a.json", method=core.Method("checkpoints/m1")),
        core.Stage("m2", "b.json", needs=("m1",), method=core.Method("checkpoints/m2")),
        core.Stage("uses", "c.json", needs_methods=True, reads=("@methods.batch_size", "eval")),
    ])
    assert reg["uses"].needs == ("m1", "m2")
    assert reg["uses"].reads == ("m1.batch_size", "m2.batch_size", "eval")
    assert reg.variants == ("base", "m1", "m2") and reg.aligned == ("m1", "m2")


def test_a_methods_trl_block_passes_verbatim_and_unknown_or_clashing_keys_are_one_line_errors():
    from pipeline import training as T

    @dataclasses.dataclass
    class FakeConfig:   # stands in for a TRL config class (no TRL import in a unit test)
        learning_rate: float = 1.0
        neftune_noise_alpha: float | None = None

    cfg = load_config(tier="tiny", overrides=["sft.trl={neftune_noise_alpha: 5}"])
    assert T.trl_config(FakeConfig, "sft", cfg.sft, learning_rate=0.1).neftune_noise_alpha == 5
    bad = load_config(tier="tiny", overrides=["sft.trl={neftune_alpha: 5}"])
    with pytest.raises(core.StageFailed, match=r"sft\.trl: FakeConfig has no field neftune_alpha"):
        T.trl_config(FakeConfig, "sft", bad.sft, learning_rate=0.1)
    clash = load_config(tier="tiny", overrides=["sft.trl={learning_rate: 5}"])
    with pytest.raises(core.StageFailed, match=r"sft\.trl sets learning_rate"):
        T.trl_config(FakeConfig, "sft", clash.sft, learning_rate=0.1)


def test_every_training_method_runs_on_n_ranks_and_prepares_once_in_the_parent():
    """NPROC>1 trains a method on N ranks (launch.runner_for): a method file that forgets `distributed=True`
    would silently train in one process; `prepare` (training.prepare) gates and builds the model once."""
    from pipeline import training
    for name in REGISTRY.methods:
        stage = REGISTRY[name]
        assert stage.distributed and stage.prepare is training.prepare, name
    assert not any(s.distributed for s in REGISTRY.stages if not s.method)

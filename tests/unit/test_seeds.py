"""Seed replicates (issue 12 §6): SEEDS parsing and validation, the mean +- sd arithmetic, the registry's expansion
into <stage>@seed<N> stages, and the engine's skip/resume/fingerprint logic applied to each replicate (fake stages,
no model).

Run: .venv/bin/python -m pytest -q tests/unit/test_seeds.py
"""
from __future__ import annotations

import io
import json
import statistics

import numpy as np
import pytest
from rich.console import Console

from pipeline import engine, seeds
from pipeline.core import Method, Registry, Stage
from pipeline.settings import ConfigError, load_config
from pipeline.stages import REGISTRY


def env(tmp_path, **extra) -> dict:
    return {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", **extra}


# --- SEEDS: parsing and validation ----------------------------------------------------------------
@pytest.mark.parametrize("raw,want", [("1,2,3", [1, 2, 3]), (" 1, 2 ,3 ", [1, 2, 3]), ("0", [0]), ("", []),
                                      ("[4, 5]", [4, 5]), ("07", [7])])
def test_seeds_from_the_environment_are_non_negative_integers(tmp_path, raw, want):
    assert load_config(env=env(tmp_path, SEEDS=raw)).runtime.seeds == want


@pytest.mark.parametrize("raw", ["a", "1,b", "-1", "1.5", "1;2", "1,2,+3", "²"])
def test_a_bad_seeds_value_is_one_line_naming_seeds(tmp_path, raw):
    with pytest.raises(ConfigError) as err:
        load_config(env=env(tmp_path, SEEDS=raw))
    message = str(err.value)
    assert message.startswith("environment variable SEEDS:") and "\n" not in message, message
    assert "SEEDS=1,2,3" in message, message


def test_seeds_as_a_config_key_and_an_argument(tmp_path):
    assert load_config(env=env(tmp_path), overrides=["runtime.seeds=[3, 4]"]).runtime.seeds == [3, 4]
    with pytest.raises(ConfigError) as err:
        load_config(env=env(tmp_path), overrides=["runtime.seeds=[true]"])
    assert str(err.value).startswith("argument runtime.seeds=[true]:"), str(err.value)
    base = load_config(env=env(tmp_path))
    assert base.runtime.seeds == [] and base.runtime.replicate_sft is False   # configs/base.yaml


def test_duplicates_and_the_main_seed_are_dropped_with_a_note(tmp_path):
    cfg = load_config(env=env(tmp_path, SEEDS="2,42,1,2"))   # the main seed is runtime.seed: 42
    extra, notes = seeds.extra_seeds(cfg)
    assert extra == [2, 1]
    assert len(notes) == 2 and "42 is the main run's seed" in notes[0] and "2 is listed twice" in notes[1]
    cfg = load_config(env=env(tmp_path, SEEDS="1,2", SEED="1"))
    assert seeds.extra_seeds(cfg)[0] == [2]


# --- mean and standard deviation -----------------------------------------------------------------
def test_mean_and_sample_sd_across_seeds_match_numpy():
    per_seed = {42: 0.5, 1: 0.625, 2: 0.25}
    out = seeds.mean_sd(per_seed)
    values = np.array(list(per_seed.values()))
    assert out["mean"] == pytest.approx(values.mean()) and out["sd"] == pytest.approx(values.std(ddof=1))
    assert out["sd"] == pytest.approx(0.190940654, abs=1e-9)   # by hand: sqrt(((0)^2+(.125)^2+(.25)^2... )/2)
    assert out["n_seeds"] == 3 and out["per_seed"] == {"42": 0.5, "1": 0.625, "2": 0.25}
    one = seeds.mean_sd({42: 0.375})
    assert one["mean"] == 0.375 and one["sd"] is None and one["n_seeds"] == 1
    assert seeds.mean_sd({1: 0.5, 2: 0.5})["sd"] == statistics.stdev([0.5, 0.5]) == 0


def test_the_seeds_summary_puts_the_main_run_beside_each_seed():
    from pipeline.stages import seeds as stage
    res = lambda acc: {"accuracy": acc, "ci_low": acc - 0.1, "ci_high": acc + 0.1, "n": 8}   # noqa: E731
    main = {"results": {"base": {"medqa": res(0.25)}, "dpo": {"medqa": res(0.5)}, "kto": {"medqa": res(0.375)}}}
    docs = {1: {"results": {"dpo": {"medqa": res(0.625)}, "kto": {"medqa": res(0.125)}}},
            2: {"results": {"dpo": {"medqa": res(0.25)}}}}   # seed 2 has no kto: kto is not summarised
    out = stage.summary(main, docs, 42)
    assert list(out) == ["dpo"]
    entry = out["dpo"]["medqa"]
    assert entry["per_seed"] == {"42": 0.5, "1": 0.625, "2": 0.25}
    assert entry["mean"] == pytest.approx(np.mean([0.5, 0.625, 0.25]))
    assert entry["sd"] == pytest.approx(np.std([0.5, 0.625, 0.25], ddof=1))
    assert entry["main"] == {"accuracy": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 8}


# --- the registry's expansion ----------------------------------------------------------------------
def test_the_registry_expands_every_method_after_sft_and_nothing_else(tmp_path):
    cfg = load_config(env=env(tmp_path, SEEDS="1,2"))
    reg = seeds.expand(REGISTRY, cfg)
    after_sft = [m for m in REGISTRY.methods if REGISTRY[m].method.start == "sft"]
    assert after_sft == list(REGISTRY.aligned) and "sft" not in after_sft
    for seed in (1, 2):
        for m in after_sft:
            rep = reg[f"{m}@seed{seed}"]
            assert rep.checkpoint(cfg) == f"checkpoints/seeds/{seed}/{m}" and rep.needs == ("sft",)
            assert rep.evidence(cfg) == f"reports/training/seeds/{seed}/{REGISTRY[m].evidence(cfg).rsplit('/', 1)[1]}"
            assert rep.replicate.start == "sft" and rep.kind == m and rep.run is REGISTRY[m].run
            assert rep.checks is REGISTRY[m].checks and rep.schema == m
        assert f"sft@seed{seed}" not in reg
        assert set(reg[f"eval@seed{seed}"].needs) >= {f"{m}@seed{seed}" for m in after_sft}
    assert reg.methods == REGISTRY.methods and reg.variants == REGISTRY.variants   # replicates are no variants
    assert {"eval@seed1", "eval@seed2"} <= set(reg["seeds"].needs)
    names = [s.name for s in reg.stages]
    assert names.index("reports") < names.index("dpo@seed1") < names.index("seeds")   # main results come first
    assert seeds.expand(REGISTRY, load_config(env=env(tmp_path))) is REGISTRY


def test_replicate_sft_replicates_sft_and_the_methods_start_from_their_seeds_sft(tmp_path):
    cfg = load_config(env=env(tmp_path, SEEDS="3"), overrides=["runtime.replicate_sft=true"])
    reg = seeds.expand(REGISTRY, cfg)
    assert reg["sft@seed3"].checkpoint(cfg) == "checkpoints/seeds/3/sft"
    assert reg["dpo@seed3"].needs == ("sft@seed3",) and reg["dpo@seed3"].replicate.start == "sft@seed3"
    assert "sft@seed3" in reg["eval@seed3"].needs


def test_the_main_stages_fingerprints_do_not_move_with_seeds_and_each_replicate_has_its_own(tmp_path):
    plain = load_config(env=env(tmp_path))
    cfg = load_config(env=env(tmp_path, SEEDS="1,2"), overrides=["runtime.replicate_sft=true"])
    reg = seeds.expand(REGISTRY, cfg)
    for stage in REGISTRY.stages:
        if stage.name != "seeds":   # the summary reads runtime.seeds: its fingerprint is the one that moves
            assert engine.fingerprint(stage, plain, REGISTRY) == engine.fingerprint(reg[stage.name], cfg, reg), \
                stage.name
    prints = {engine.fingerprint(reg[f"dpo@seed{s}"], cfg, reg)[0] for s in (1, 2)}
    assert len(prints) == 2 and engine.fingerprint(REGISTRY["dpo"], plain, REGISTRY)[0] not in prints
    assert engine.make_ctx(reg["dpo@seed2"], cfg, Console(file=io.StringIO()), reg).cfg.runtime.seed == 2
    assert engine.make_ctx(reg["dpo"], cfg, Console(file=io.StringIO()), reg).cfg.runtime.seed == 42


def test_a_rank_of_a_replicate_finds_its_stage(tmp_path):
    from pipeline.core import stage_config
    cfg = load_config(env=env(tmp_path, SEEDS="1,2"))
    reg = seeds.expand(REGISTRY, cfg)
    rank_cfg = stage_config(reg["kto@seed2"], cfg)    # what the launcher writes for the ranks: runtime.seed 2
    found = seeds.worker_registry(REGISTRY, rank_cfg, "kto@seed2")
    assert found["kto@seed2"] == reg["kto@seed2"]
    assert seeds.worker_registry(REGISTRY, rank_cfg, "kto") is REGISTRY


# --- the engine on replicates (fake stages: no model) ------------------------------------------------
CALLS: list = []


def _train(ctx) -> dict:
    """A fake method: writes its 'final' where its declaration says, recording the seed it was given."""
    CALLS.append((ctx.name, ctx.cfg.runtime.seed))
    final = ctx.path(f"{ctx.stage.checkpoint(ctx.cfg)}/final/weights.txt")
    final.write_text(f"{ctx.stage.kind} trained with seed {ctx.cfg.runtime.seed}\n")
    return {"outputs": [str(final.parent.relative_to(ctx.root))]}


def fake_registry() -> Registry:
    return Registry([
        Stage("fake_sft", "reports/fake/sft.json", reads=("runtime.seed",), training=True, run=_train,
              method=Method("ck/fake_sft", start="base")),
        Stage("fake_dpo", "reports/fake/dpo.json", needs=("fake_sft",), reads=("runtime.seed",), training=True,
              run=_train, method=Method("ck/fake_dpo", start="fake_sft")),
    ])


def _run(tmp_path, **extra) -> tuple[int, str]:
    out = io.StringIO()
    rc = engine.run(["all"], load_config(env=env(tmp_path, **extra)), Console(file=out, width=200), fake_registry())
    return rc, out.getvalue()


def test_each_replicate_runs_once_with_its_seed_then_is_up_to_date_and_a_new_seed_adds_only_its_own(tmp_path):
    CALLS.clear()
    assert _run(tmp_path)[0] == 0
    main = {rel: (tmp_path / rel).read_bytes() for rel in ("reports/fake/sft.json", "reports/fake/dpo.json",
                                                          "ck/fake_dpo/final/weights.txt")}
    CALLS.clear()
    rc, text = _run(tmp_path, SEEDS="1,42,2")
    assert rc == 0 and CALLS == [("fake_dpo@seed1", 1), ("fake_dpo@seed2", 2)], CALLS
    assert "42 is the main run's seed" in text
    assert (tmp_path / "checkpoints/seeds/2/fake_dpo/final/weights.txt").read_text() == "fake_dpo trained with seed 2\n"
    doc = json.loads((tmp_path / "reports/training/seeds/2/dpo.json").read_text())
    assert doc["stage"] == "fake_dpo@seed2" and doc["status"] == "ok" and "runtime.seed" in doc["config_read"]
    assert {rel: (tmp_path / rel).read_bytes() for rel in main} == main   # the main run is untouched
    CALLS.clear()
    assert _run(tmp_path, SEEDS="1,2")[0] == 0 and CALLS == []           # finished replicates: up to date
    assert _run(tmp_path, SEEDS="1,2,3")[0] == 0 and CALLS == [("fake_dpo@seed3", 3)]
    assert _run(tmp_path)[0] == 0 and CALLS == [("fake_dpo@seed3", 3)]   # SEEDS unset: the main run, up to date


def test_a_tampered_replicate_is_redone_and_the_main_run_is_not(tmp_path):
    CALLS.clear()
    assert _run(tmp_path, SEEDS="5")[0] == 0
    (tmp_path / "checkpoints/seeds/5/fake_dpo/final/weights.txt").write_text("edited\n")
    CALLS.clear()
    assert _run(tmp_path, SEEDS="5")[0] == 0 and CALLS == [("fake_dpo@seed5", 5)]


# --- the gate's check of the summary -------------------------------------------------------------
def _common(stage: str, **fields) -> dict:
    return {"stage": stage, "status": "ok", "skipped": False, "reason": None, "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:01:00+00:00", "duration_s": 60.0, "git_commit": None,
            "config_hash": "0" * 64, "fingerprint": "0" * 64, "versions": {}, "inputs": {}, "outputs": {},
            "model_tier": "tiny", **fields}


def test_the_gate_recomputes_the_mean_and_sd_and_refuses_an_edited_one(tmp_path):
    from pipeline import evidence as ev
    from pipeline.gate import Gate
    from pipeline.stages import seeds as stage
    cfg = load_config(env=env(tmp_path, SEEDS="1,2"))
    reg = seeds.expand(REGISTRY, cfg)
    res = lambda acc: {"accuracy": acc, "ci_low": 0.0, "ci_high": 1.0, "n": 8}   # noqa: E731
    main = {"results": {"dpo": {"medqa": res(0.5)}}}
    per_seed = {1: {"results": {"dpo": {"medqa": res(0.25)}}}, 2: {"results": {"dpo": {"medqa": res(0.75)}}}}
    ev.atomic_write_json(tmp_path / reg["eval"].evidence(cfg), main)
    for seed, doc in per_seed.items():
        ev.atomic_write_json(tmp_path / reg[f"eval@seed{seed}"].evidence(cfg), doc)
    doc = _common("seeds", main_seed=42, extra_seeds=[1, 2], replicate_sft=False, notes=[],
                  seeds=stage.summary(main, per_seed, 42))
    assert doc["seeds"]["dpo"]["medqa"]["sd"] == pytest.approx(0.25)   # sd of 0.5, 0.25, 0.75
    g = Gate(cfg, reg, {}).of(reg["seeds"])
    [check] = stage.checks(g, doc)
    assert check.passed, check.detail
    doc["seeds"]["dpo"]["medqa"]["mean"] = 0.9
    [check] = stage.checks(g, doc)
    assert not check.passed and "seeds.dpo.medqa.mean is 0.9, recomputed 0.5" in check.detail, check.detail
    [check] = stage.checks(Gate(load_config(env=env(tmp_path, SEEDS="1")), reg, {}).of(reg["seeds"]), doc)
    assert not check.passed and "not the seeds SEEDS asks for now ([1])" in check.detail, check.detail

"""The preflight on the tiny tier: measured evidence per training method, a budget that stops `run all` before
SFT, and an out-of-memory batch halved until it fits.

Run: .venv/bin/python -m pytest -q tests/integration/test_preflight.py          (the session Day-1's evidence)
     .venv/bin/python -m pytest -q -m slow tests/integration/test_preflight.py  (fresh preflights, ~1-2 min)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import evidence as ev
from pipeline import training as T
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline.stages import REGISTRY

PREFLIGHT = "reports/migration/preflight.json"


def preflight(root: Path) -> dict:
    return json.loads((root / PREFLIGHT).read_text())


def test_the_cpu_tiers_skip_the_preflight_unless_asked(day1_env):
    """On tiny/demo a measured step costs about what their few training steps do: `run all` skips it, saying how
    to ask for it; the GPU tiers (and a rehearsal of one) run it by themselves."""
    doc = preflight(day1_env)
    assert doc["status"] == "skipped" and "make preflight" in doc["reason"]
    from pipeline.stages.preflight import wanted
    assert wanted(load_config(tier="7b")) and not wanted(load_config(tier="demo"))
    assert wanted(load_config(tier="demo", overrides=["preflight.budget=5", "preflight.price_per_hour=2"]))


@pytest.mark.slow
def test_the_day1_preflight_measured_every_method_and_predicted_the_run(day1_env):
    assert main(["run", "preflight", "--force", "preflight.enabled=true"]) == 0
    doc = preflight(day1_env)
    cfg = load_config()
    assert doc["status"] == "ok" and ev.validate("preflight", doc) == []
    assert set(doc["stages"]) == set(REGISTRY.methods)
    for kind, rec in doc["stages"].items():
        planned = T.first_batch(kind, getattr(cfg, kind).batch_size, getattr(cfg, kind).grad_acc)[:2]
        assert rec["s_per_step"] > 0 and rec["tokens_per_s"] > 0, kind
        assert (rec["batch"], rec["grad_acc"]) == planned, kind   # it fit at the planned batch
        assert rec["attempts"] == [{"batch": planned[0], "grad_acc": planned[1], "oom": False}], kind
        assert rec["predicted_s"] >= rec["planned_steps"] * rec["s_per_step"] - 0.01, kind
    assert doc["predicted_total_s"] == pytest.approx(sum(r["predicted_s"] for r in doc["stages"].values()), abs=0.1)
    assert doc["max_live_models"] <= 1 and doc["predicted_cost"] is None   # no GPU_PRICE_PER_HOUR set
    assert not (day1_env / "checkpoints/.preflight").exists()               # its trial folders are gone


def _env(monkeypatch, root: Path, **extra):
    for k, v in {"PIPELINE_ROOT": str(root), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1", **extra}.items():
        monkeypatch.setenv(k, v)


@pytest.mark.slow
def test_a_budget_below_the_prediction_stops_run_all_before_sft(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path, BUDGET="0.000001", GPU_PRICE_PER_HOUR="1")
    assert main(["run", "all"]) == 1
    doc = preflight(tmp_path)
    assert doc["status"] == "failed" and doc["reason_code"] == "over_budget" and ev.validate("preflight", doc) == []
    assert "exceeds BUDGET=1e-06 by" in doc["reason"] and "\n" not in doc["reason"]
    assert set(doc["stages"]) == set(REGISTRY.methods) and doc["predicted_cost"] > doc["budget"]
    assert not (tmp_path / "reports/training").exists()   # no training metrics: nothing trained
    assert not any(p.is_file() for p in (tmp_path / "checkpoints").rglob("*"))   # and no checkpoint written


@pytest.mark.slow
def test_an_out_of_memory_at_the_planned_batch_makes_the_preflight_pick_half(tmp_path, monkeypatch):
    _env(monkeypatch, tmp_path, MEDLLM_INJECT_OOM_AT_STEP="1")
    assert main(["run", "preflight", "preflight.enabled=true"]) == 0
    for kind, rec in preflight(tmp_path)["stages"].items():
        first, last = rec["attempts"][0], rec["attempts"][-1]
        assert first["oom"] and "injected" in first["error"] and not last["oom"], kind
        assert (last["batch"], last["grad_acc"]) == (first["batch"] // 2, first["grad_acc"] * 2), kind
        assert (rec["batch"], rec["grad_acc"]) == (last["batch"], last["grad_acc"]), kind

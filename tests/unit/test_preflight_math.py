"""The preflight's arithmetic and budget decision (pure functions, no model), and its config keys.

Run: .venv/bin/python -m pytest -q tests/unit/test_preflight_math.py
"""
from __future__ import annotations

import pytest

from pipeline.settings import ConfigError, load_config
from pipeline.stages import REGISTRY
from pipeline.stages import preflight as P


def test_a_stage_is_predicted_as_its_steps_at_the_measured_rate_plus_the_stated_allowance():
    got = P.predict_stage(planned_steps=100, s_per_step=2.0, load_s=10.0, loads=2, save_s=1.0, saves=5,
                          eval_passes=4, eval_batches=6, grad_acc=2)
    assert got["train_s"] == 200.0
    assert got["allowance"] == {"model_load_s": 20.0, "saves_s": 5 * P.SAVE_FACTOR,
                                "eval_loss_s": round(4 * 6 * P.EVAL_FORWARD_SHARE * 2.0 / 2, 2)}
    assert got["fixed_s"] == 20.0 + 5 * P.SAVE_FACTOR
    assert got["predicted_s"] == pytest.approx(200.0 + sum(got["allowance"].values()), abs=0.02)


def test_cost_is_hours_times_price_and_none_without_a_price():
    assert P.cost(7200, 2.5) == 5.0
    assert P.cost(7200, None) is None


def test_no_budget_always_fits_and_a_budget_above_the_cost_fits():
    assert P.budget_decision(36000, 100, 3.0, None, {"sft": 100}) == (True, None)
    assert P.budget_decision(3600, 100, 3.0, 3.0, {"sft": 100}) == (True, None)


def test_over_budget_says_by_how_much_and_which_step_counts_fit():
    # 2 h at 3/h = 6.00 against a budget of 4.50; 100 s fixed; (4.5/3*3600 - 100) / (7200 - 100) of the steps
    fits, reason = P.budget_decision(7200, 100, 3.0, 4.5, {"sft": 200, "dpo": 100})
    scale = (4.5 / 3 * 3600 - 100) / (7200 - 100)
    assert not fits and "\n" not in reason
    assert "predicted cost 6.00 exceeds BUDGET=4.5 by 1.50" in reason
    assert f"sft.max_steps={int(200 * scale)} dpo.max_steps={int(100 * scale)}" in reason


def test_a_budget_below_the_fixed_part_names_the_fixed_cost_and_no_step_counts():
    fits, reason = P.budget_decision(7200, 3600, 3.0, 2.0, {"sft": 200})
    assert not fits and "model loads and saves alone cost 3.00" in reason and "max_steps" not in reason


def test_the_longest_rows_are_picked_and_repeated_when_too_few():
    assert P.longest(["a", "ccc", "bb"], 2, len) == ["ccc", "bb"]
    assert P.longest(["a", "bb"], 5, len) == ["bb", "a", "bb", "a", "bb"]


@pytest.mark.parametrize("env, fragment", [
    ({"BUDGET": "-1", "GPU_PRICE_PER_HOUR": "2"}, "environment variable BUDGET: preflight.budget must be a finite"),
    ({"BUDGET": "nan", "GPU_PRICE_PER_HOUR": "2"}, "environment variable BUDGET: preflight.budget must be a finite"),
    ({"BUDGET": "5"}, "needs price_per_hour (GPU_PRICE_PER_HOUR)"),
    ({"GPU_PRICE_PER_HOUR": "-3"}, "GPU_PRICE_PER_HOUR: preflight.price_per_hour must be a finite"),
])
def test_a_bad_budget_or_price_is_a_one_line_error_naming_the_variable(tiny_env, env, fragment):
    with pytest.raises(ConfigError, match=None) as exc:
        load_config(env={"MODEL_TIER": "tiny", "PIPELINE_ROOT": str(tiny_env), **env})
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_budget_and_price_reach_the_preflight_section(tiny_env):
    cfg = load_config(env={"MODEL_TIER": "tiny", "PIPELINE_ROOT": str(tiny_env), "BUDGET": "12.5",
                           "GPU_PRICE_PER_HOUR": "2"})
    assert (cfg.preflight.budget, cfg.preflight.price_per_hour) == (12.5, 2.0)


def test_run_all_runs_the_preflight_before_any_training_and_a_failure_stops_there():
    order = [s.name for s in REGISTRY.order(["all"])]
    assert order.index("preflight") < min(order.index(m) for m in REGISTRY.methods)
    assert REGISTRY["preflight"].stops_run and REGISTRY["preflight"].needs == ("gpu_check",)


def test_a_failed_stage_that_stops_the_run_leaves_every_later_stage_unrun(tiny_env):
    """The engine part of the budget: `run all` stops at a failed preflight, so nothing after it trains."""
    import io

    from rich.console import Console

    from pipeline import core, engine

    def over_budget(ctx):
        return {"status": "failed", "reason": "predicted cost 9.00 exceeds BUDGET=1", "reason_code": "over_budget"}
    ran = []
    reg = core.Registry([core.Stage("gatekeeper", "reports/fake/gatekeeper.json", run=over_budget, stops_run=True),
                         core.Stage("train", "reports/fake/train.json", run=lambda ctx: ran.append(1) or {})])
    assert engine.run(["all"], load_config(), Console(file=io.StringIO()), reg) == 1
    assert ran == [] and not (tiny_env / "reports/fake/train.json").exists()
    doc = engine.ev.read_json(tiny_env / "reports/fake/gatekeeper.json")
    assert (doc["status"], doc["reason_code"]) == ("failed", "over_budget")

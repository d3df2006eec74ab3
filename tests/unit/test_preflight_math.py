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


class WordTokenizer:
    """One token per word of the conversation (and one for the assistant's turn marker), as
    apply_chat_template(tokenize=True) returns them."""
    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        return {"input_ids": [w for m in messages for w in m["content"].split()] + ["<a>"] * add_generation_prompt}


def test_the_trial_rows_are_the_longest_in_tokens_and_the_rate_scales_to_the_stage_rows():
    """The demo SFT trial once ran on the rows with the most characters, which were short in tokens (its second step
    saw 128 tokens where the stage's steps saw up to 256), so the SFT stage ran 1.43x its prediction."""
    def row(reply):
        return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]}
    long_chars, many_words, middle = row("x" * 400), row("a b c d e f g h"), row("a b c")   # 2, 9 and 4 tokens
    rows, tokens = P.pick_rows(WordTokenizer(), [long_chars, middle, many_words], 2, length=6)
    assert rows == [many_words, middle]                       # 9 tokens cut at length 6, then 4
    assert tokens == {"trial_mean": 5.0, "planned_mean": round((2 + 4 + 6) / 3, 1), "scale": round(12 / 3 / 5, 4)}
    pair = {"prompt": [{"role": "user", "content": "q q"}], "chosen": [{"role": "assistant", "content": "a a a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    assert P.row_tokens(WordTokenizer(), pair, length=4) == 4 + 3   # prompt + chosen cut at 4, prompt + rejected


def test_an_sft_row_whose_reply_is_cut_away_is_not_a_trial_row():
    """TRL's SFTTrainer drops a row whose prompt fills max_length (no loss token left): the demo SFT trial once got
    four such rows and trained on one of them per step where the stage trains two (batch 2)."""
    def row(user, reply):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
    cut_away, kept, short = row("w " * 10, "r r"), row("w w", "r r r r r r"), row("w", "r")
    rows, tokens = P.pick_rows(WordTokenizer(), [cut_away, kept, short], 2, length=6)
    assert P.row_tokens(WordTokenizer(), cut_away, 6) == 0 and rows == [kept, short]
    assert tokens["planned_mean"] == (6 + 2) / 2    # the dropped row is not in the stage's mean either


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


# --- between stages: the re-projection and the engine's guard (issue 10) ------------------------------------
from pipeline import preflight_kit as K  # noqa: E402


def test_the_next_stage_is_stopped_when_the_spend_after_it_would_cross_the_budget():
    # 1 currency per second: 100 s spent, dpo predicted 50 s -> 150 after it, above a budget of 120
    got = K.reproject(100.0, {"dpo": 50.0, "eval": 30.0}, ["dpo", "eval"], 3600.0, 120.0)
    assert got["stop"] and got["projection_s"] == 180.0
    assert "\n" not in got["reason"] and "crossed by dpo" in got["reason"]
    assert "spent so far 100" in got["reason"] and "projection of the whole run 180" in got["reason"]


def test_a_later_stage_that_would_cross_the_budget_is_decided_at_its_turn_and_no_budget_never_stops():
    assert not K.reproject(100.0, {"dpo": 10.0, "eval": 30.0}, ["dpo", "eval"], 3600.0, 120.0)["stop"]
    assert K.reproject(1e9, {"dpo": 1e9}, ["dpo"], 3600.0, None) == {"stop": False, "projection_s": None,
                                                                    "reason": None}
    assert not K.reproject(0.0, {}, ["reports"], 3600.0, 1.0)["stop"]   # an unpredicted stage costs nothing


def test_a_stage_starts_at_the_smaller_batch_an_ok_preflight_found_and_says_so():
    doc = {"status": "ok", "stages": {"sft": {"batch": 2, "grad_acc": 2}, "dpo": {"batch": 4, "grad_acc": 1}}}
    batch, acc, why = K.first_attempt(doc, "sft", (4, 1, None))
    assert (batch, acc) == (2, 2) and why.startswith("preflight: batch 4 x accumulation 1 ran out of memory")
    assert K.first_attempt(doc, "dpo", (4, 1, None)) == (4, 1, "as configured")   # it fit as planned
    assert K.first_attempt({**doc, "status": "failed"}, "sft", (4, 1, None)) == (4, 1, "as configured")
    assert K.first_attempt(None, "kto", (2, 2, "raised")) == (2, 2, "raised")


def test_generation_and_judge_predictions_are_their_stated_arithmetic():
    got = K.predict_generation(5.0, {"a": {"questions": 20, "batch": 8, "batch_s": 2.0},
                                     "b": {"questions": 4, "batch": 4, "batch_s": 1.0}}, variants=6)
    assert got["per_variant_s"] == 3 * 2.0 + 1.0 and got["predicted_s"] == 5.0 + 6 * 7.0
    # the log-likelihood protocol per question at its measured rate, the free answers for the base only, and the
    # measured adapter switch per variant
    both = K.predict_generation(5.0, {"a": {"questions": 20, "batch": 8, "batch_s": 2.0, "loglik_rows": 4,
                                            "loglik_s": 1.0, "free_batch_s": 10.0},
                                      "b": {"questions": 4, "batch": 4, "batch_s": 1.0, "loglik_rows": 2,
                                            "loglik_s": 0.5}}, variants=6, free_variants=1, switch_s=0.25)
    assert both["per_variant_s"] == 7.0 + 20 / 4 * 1.0 + 4 / 2 * 0.5
    assert both["free_answer_s"] == 3 * 10.0 and both["predicted_s"] == 5.0 + 6 * 13.0 + 5 * 0.25 + 30.0
    j = K.predict_judge({"pairwise": 32, "risk": 24}, concurrency=8, latency_s=0.5, answers_s=3.0)
    assert j["waves"] == 4 + 3 and j["predicted_s"] == 7 * 0.5 + 3.0 and j["requests"] == 56


def test_predicted_against_actual_per_stage_and_in_total():
    doc = {"status": "ok", "stages": {"sft": {"predicted_s": 100.0}, "dpo": {"predicted_s": 50.0}},
           "eval": {"predicted_s": 50.0}, "judge": {"predicted_s": None}, "predicted_total_s": 200.0}
    rows = K.versus(doc, {"sft": 120.0, "dpo": None, "eval": 40.0})
    assert rows[0] == {"stage": "sft", "predicted_s": 100.0, "actual_s": 120.0, "ratio": 1.2}
    assert rows[1]["ratio"] is None and rows[-1] == {"stage": "total", "predicted_s": 150.0, "actual_s": 160.0,
                                                     "ratio": round(160 / 150, 2)}
    lines = K.timeline(doc)
    assert [x.split()[0] for x in lines] == ["sft", "dpo", "eval", "total"] and "+3.3 min" in lines[2]


def _guarded_registry(decide, ran):
    from pipeline import core

    def guard(cfg, registry, done, todo):
        return decide(done, todo)

    def job(name):
        def run(ctx):
            ran.append(name)
            return {}
        return run
    return core.Registry([core.Stage("meter", "reports/fake/meter.json", run=job("meter"), guard=guard),
                          core.Stage("first", "reports/fake/first.json", run=job("first")),
                          core.Stage("second", "reports/fake/second.json", run=job("second"))])


def test_a_guard_stops_the_run_before_a_stage_keeps_what_finished_and_a_rerun_continues(tiny_env):
    import io

    from rich.console import Console

    from pipeline import engine
    quiet, ran, seen = Console(file=io.StringIO()), [], []

    def over_before_second(done, todo):
        seen.append((tuple(done), tuple(todo)))
        return "BUDGET=1 would be crossed by second: spent so far 2" if todo[0] == "second" else None
    assert engine.run(["all"], load_config(), quiet, _guarded_registry(over_before_second, ran)) == 1
    assert ran == ["meter", "first"] and seen[0] == (("meter",), ("first", "second"))
    doc = engine.ev.read_json(tiny_env / "reports/fake/second.json")
    assert (doc["status"], doc["reason_code"]) == ("failed", "over_budget") and "crossed by second" in doc["reason"]
    first = engine.ev.read_json(tiny_env / "reports/fake/first.json")
    assert first["status"] == "ok"
    ran.clear()   # a larger budget: the guard lets everything through; finished stages are not redone
    assert engine.run(["all"], load_config(), quiet, _guarded_registry(lambda d, t: None, ran)) == 0
    assert ran == ["second"] and engine.ev.read_json(tiny_env / "reports/fake/first.json") == first


def test_advice_is_read_only_when_declared_and_fresh(tiny_env):
    import io

    from rich.console import Console

    from pipeline import core, engine
    got = {}

    def adviser(ctx):
        return {"hint": 3}

    def advised(ctx):
        got["doc"] = ctx.advice("adviser")
        with pytest.raises(core.StageFailed, match="advice="):
            ctx.advice("other")
        return {}
    stages = [core.Stage("adviser", "reports/fake/adviser.json", run=adviser, reads=("eval.seed",)),
              core.Stage("other", "reports/fake/other.json", run=adviser),
              core.Stage("advised", "reports/fake/advised.json", run=advised, advice=("adviser",))]
    quiet = Console(file=io.StringIO())
    assert engine.run(["adviser", "advised"], load_config(), quiet, core.Registry(stages)) == 0
    assert got["doc"]["hint"] == 3
    # the adviser is stale under another eval.seed: no advice, and the advised stage does not move (not fingerprinted)
    assert engine.run(["advised"], load_config(overrides=["eval.seed=99"]), quiet, core.Registry(stages),
                      force=True) == 0
    assert got["doc"] is None


def test_the_day1_summary_shows_predicted_against_actual_per_stage_and_in_total(tiny_env):
    import json

    from pipeline import day1
    from pipeline import evidence as ev
    cfg = load_config()
    put = lambda name, doc: ev.atomic_write_json(tiny_env / REGISTRY[name].evidence(cfg), doc)   # noqa: E731
    put("preflight", {"status": "ok", "duration_s": 12.0, "stages": {"sft": {"predicted_s": 100.0},
                                                                      "dpo": {"predicted_s": 50.0}},
                      "eval": {"predicted_s": 20.0}, "judge": {"predicted_s": 0.0}, "predicted_total_s": 170.0})
    put("sft", {"status": "ok", "duration_s": 110.0})
    put("dpo", {"status": "failed", "duration_s": 3.0})   # a failed stage has no actual to compare
    put("eval", {"status": "ok", "duration_s": 30.0})
    steps = tiny_env / "steps.jsonl"
    steps.write_text(json.dumps({"name": "gpu-run", "status": "ok", "rc": 0, "seconds": 150, "log": "", "note": ""}))
    assert day1.cli(["summary", str(steps)]) == 0
    md = (tiny_env / "reports/migration/day1_run_summary.md").read_text()
    assert "## Predicted vs actual (preflight)" in md and "Load average" in md
    assert "| sft | 100.0 | 110.0 | 1.1 |" in md and "| dpo | 50.0 | - | - |" in md
    assert "| eval | 20.0 | 30.0 | 1.5 |" in md and "| total | 120.0 | 140.0 | 1.17 |" in md

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


def test_the_tiny_tier_skips_the_preflight_unless_asked(day1_env):
    """On tiny (the tests' tier) `run all` skips it, saying how to ask for it; the GPU tiers (and a rehearsal of one)
    run it by themselves, and the demo tier's Day-1 runs it (configs/tiers/demo.yaml), so make day1-smoke shows the
    predicted timeline and the prediction against the run."""
    doc = preflight(day1_env)
    assert doc["status"] == "skipped" and "make preflight" in doc["reason"]
    from pipeline.stages.preflight import wanted
    assert wanted(load_config(tier="7b")) and wanted(load_config(tier="demo")) and not wanted(load_config(tier="tiny"))
    assert wanted(load_config(tier="tiny", overrides=["preflight.budget=5", "preflight.price_per_hour=2"]))
    assert not wanted(load_config(tier="demo", overrides=["preflight.enabled=false"]))


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
        # measured on the longest rows: the stage's own rows cost their share of the tokens
        assert 0 < rec["row_tokens"]["scale"] <= 1 and rec["row_tokens"]["trial_mean"] > 0, kind
        assert rec["s_per_step_planned_rows"] == pytest.approx(rec["s_per_step"] * rec["row_tokens"]["scale"],
                                                               abs=1e-3), kind
        assert rec["predicted_s"] >= rec["planned_steps"] * rec["s_per_step_planned_rows"] - 0.01, kind
        assert rec["warmup_steps"] == (1 if kind == "sft" else 0), kind   # CPU: the first trial warms up

    # the base loaded once for every trial, eval's and the judges' measurement, and nothing left alive after
    assert doc["max_live_models"] <= 1 and doc["base_loads"] == 1 and doc["live_models_after"] == 0
    assert doc["predicted_cost"] is None   # no GPU_PRICE_PER_HOUR set
    assert set(doc["eval"]["sets"]) == set(cfg.eval.sets) and doc["eval"]["variants"] == len(REGISTRY.variants)
    for name, part in doc["eval"]["sets"].items():   # both protocols measured; the adapter switch too
        assert part["batch_s"] > 0 and part["loglik_s"] > 0 and 1 <= part["loglik_rows"] <= part["questions"], name
    assert doc["eval"]["switch_s"] > 0 and doc["base_build_s"] >= 0
    later = doc["eval"]["predicted_s"] + doc["judge"]["predicted_s"]
    assert doc["judge"]["predicted_s"] == 0 and "judges off" in doc["judge"]["basis"]
    assert doc["predicted_total_s"] == pytest.approx(sum(r["predicted_s"] for r in doc["stages"].values()) + later,
                                                     abs=0.1)
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


QUICK = ["sft.max_steps=4", "sft.curriculum=[]", "sft.save_steps=2", "sft.eval_steps=2",
         *[f"{m}.{k}=2" for m in REGISTRY.aligned for k in ("max_steps", "save_steps")],
         "eval.sample_sizes={medqa: 2, pubmedqa: 2, cmmlu: 2}", "eval.n_bootstrap=50"]


@pytest.mark.slow
def test_an_out_of_memory_at_the_planned_batch_makes_the_preflight_pick_half_and_sft_start_there(tmp_path,
                                                                                                 monkeypatch):
    _env(monkeypatch, tmp_path, MEDLLM_INJECT_OOM_AT_STEP="1")
    assert main(["run", "preflight", "preflight.enabled=true", *QUICK]) == 0
    doc = preflight(tmp_path)
    for kind, rec in doc["stages"].items():
        first, last = rec["attempts"][0], rec["attempts"][-1]
        assert first["oom"] and "injected" in first["error"] and not last["oom"], kind
        assert (last["batch"], last["grad_acc"]) == (first["batch"] // 2, first["grad_acc"] * 2), kind
        assert (rec["batch"], rec["grad_acc"]) == (last["batch"], last["grad_acc"]), kind
    assert doc["max_live_models"] <= 1 and doc["base_loads"] == 1   # every trial, OOMs included, on one base
    monkeypatch.delenv("MEDLLM_INJECT_OOM_AT_STEP")   # the hook is untracked: the preflight stays fresh
    assert main(["run", "sft", "preflight.enabled=true", *QUICK]) == 0
    sft = json.loads(next((tmp_path / "reports/training").glob("layer_b_*_sft_metrics.json")).read_text())
    attempts, found = sft["batch"]["attempts"], doc["stages"]["sft"]
    assert attempts[0]["reason"].startswith("preflight") and len(attempts) == 1, attempts
    assert (attempts[0]["per_device"], attempts[0]["grad_acc"]) == (found["batch"], found["grad_acc"])
    assert sft["oom_retries"] == [] and sft["status"] == "ok"   # no out-of-memory retry inside the stage


def _durations(root: Path, names) -> float:
    return sum(json.loads((root / REGISTRY[n].evidence(load_config())).read_text())["duration_s"] for n in names)


@pytest.mark.slow
def test_a_budget_crossed_after_sft_stops_before_dpo_and_a_larger_one_finishes_without_redoing_sft(tmp_path,
                                                                                                 monkeypatch):
    _env(monkeypatch, tmp_path, GPU_PRICE_PER_HOUR="3600")   # 1 currency unit per second: money reads as seconds
    assert main(["run", "preflight", "sft", *QUICK]) == 0
    doc, sft_rel = preflight(tmp_path), REGISTRY["sft"].evidence(load_config())
    # what is spent by the time dpo would start, plus half of dpo's prediction: sft fits (it is done), dpo does not
    budget = _durations(tmp_path, ["gpu_check", "preflight", "sft"]) + doc["stages"]["dpo"]["predicted_s"] / 2
    sft_before = json.loads((tmp_path / sft_rel).read_text())
    monkeypatch.setenv("BUDGET", f"{budget:.3f}")
    assert main(["run", "all", *QUICK]) == 1
    dpo = json.loads((tmp_path / REGISTRY["dpo"].evidence(load_config())).read_text())
    assert (dpo["status"], dpo["reason_code"]) == ("failed", "over_budget") and ev.validate("dpo", dpo) == []
    assert "crossed by dpo" in dpo["reason"] and "spent so far" in dpo["reason"] and "projection" in dpo["reason"]
    assert json.loads((tmp_path / sft_rel).read_text()) == sft_before   # nothing finished is lost
    assert not (tmp_path / REGISTRY["dpo"].checkpoint(load_config()) / "final").exists()
    assert not (tmp_path / REGISTRY["simpo"].evidence(load_config())).exists()   # nothing after it ran
    monkeypatch.setenv("BUDGET", "1000000")
    assert main(["run", "all", *QUICK]) == 0
    assert json.loads((tmp_path / sft_rel).read_text()) == sft_before   # SFT was not redone
    for name in REGISTRY.aligned:
        assert json.loads((tmp_path / REGISTRY[name].evidence(load_config())).read_text())["status"] == "ok", name


@pytest.mark.slow
def test_the_judge_prediction_measures_one_request_at_the_endpoint(tiny_env, monkeypatch):
    """Enabled judges: the planned requests in waves of judge.concurrency at one measured request's latency, plus
    the answers' generation; the fake OpenAI server sees exactly one request, and the key is nowhere in it."""
    import io

    from rich.console import Console

    from pipeline import engine, models
    from pipeline.preflight_eval import judge_prediction
    from tests.fakes import FAKE_KEY, start_fake_openai
    assert main(["run", "gpu_check"]) == 0
    with start_fake_openai(latency_ms=50) as server:
        for k, v in {"ENABLE_LLM_JUDGE": "true", "ENABLE_LLM_RISK_JUDGE": "true", "OPENAI_API_KEY": FAKE_KEY,
                     "OPENAI_BASE_URL": server.base_url}.items():
            monkeypatch.setenv(k, v)
        cfg = load_config()
        ctx = engine.make_ctx(REGISTRY["preflight"], cfg, Console(file=io.StringIO()), REGISTRY)
        base = models.base_for(cfg)
        got = judge_prediction(ctx, base, models.load_model(base, ctx.plan).eval())
        assert server.n_chat == 1
    questions = cfg.data.judge_heldout_size
    assert got["per_kind"] == {"pairwise": len(REGISTRY.aligned) * questions * 2,
                               "risk": len(REGISTRY.variants) * questions}
    assert got["predicted_s"] == pytest.approx(got["waves"] * got["latency_s"] + got["answers_s"], abs=0.02)
    assert got["latency_s"] > 0 and FAKE_KEY not in json.dumps(got)


def test_a_base_given_back_without_adapters_is_the_base_as_loaded(tiny_env):
    """The preflight wraps one loaded base in every trial: models.without_adapters takes every LoRA layer out, so
    the next trainer finds the base as it was loaded (same parameter names and values)."""
    import torch
    from peft import get_peft_model

    from pipeline import models
    cfg = load_config()
    plan = {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "quantization": None}
    base = models.load_model(models.base_for(cfg), plan, trainable=True)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = get_peft_model(base, T.lora_config(cfg))
    assert any(".lora_A." in k for k in base.state_dict())   # PEFT injects its layers into the base itself
    for p in wrapped.parameters():
        if p.requires_grad:
            p.data.add_(1.0)   # a trained adapter
    assert models.without_adapters(base) is base
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)

"""Readiness blockers for a trained model that broke (issue 12 §7), on fabricated evidence: format failures far above
the base's, and SFT's held-out eval loss ending above where it started. Both are recomputed from the files (the
per-question predictions, the trainer's own log), never read back from a recorded rate or flag.
Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_readiness.py
"""
from __future__ import annotations

import json

import pytest

from pipeline import evidence as ev
from pipeline.readiness import thesis_readiness
from pipeline.settings import ConfigError, load_config
from pipeline.stages import REGISTRY

GOLD = "ABCDABCD"


def _cfg(root, *overrides):
    return load_config(tier="7b", env={"PIPELINE_ROOT": str(root)}, overrides=list(overrides))


def _write_eval(root, answers: dict, recorded_rate=0.0):
    """Predictions per variant on one medqa sample (None: no readable answer), and an eval_default.json whose
    recorded format-failure rates are all `recorded_rate` (the blocker must not read them)."""
    (root / "reports/eval/predictions").mkdir(parents=True, exist_ok=True)
    for v, xs in answers.items():
        rows = [{"id": f"q{i}", "set": "medqa", "extracted": x, "gold": g} for i, (x, g) in enumerate(zip(xs, GOLD))]
        (root / f"reports/eval/predictions/{v}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.atomic_write_json(root / "reports/eval/eval_default.json", {
        "status": "ok", "variants": {v: {"status": "scored"} for v in answers},
        "results": {v: {"medqa": {"format_failure_rate": recorded_rate, "format_failures": 0}} for v in answers}})


def _blockers(cfg, word: str) -> list[str]:
    return [b for b in thesis_readiness(cfg, strict_pass=True)["blockers"] if word in b]


def test_format_failures_far_above_the_bases_block_writing(tmp_path):
    cfg = _cfg(tmp_path)
    base = ["A", "B", None, "D", "A", "B", "C", "D"]                       # 1 of 8 unreadable
    _write_eval(tmp_path, {"base": base, "sft": ["A", None, None, "D", "A", "B", "C", "D"]})   # 2 of 8: +12.5 points
    [blocker] = _blockers(cfg, "readable answer")
    assert "variant sft" in blocker and "medqa" in blocker and "25% of medqa (2 of 8)" in blocker
    assert "the base to 12% (1 of 8)" in blocker and "eval.format_failure_margin 10%" in blocker
    # a wider margin lets it through; the base's own failures are never a blocker
    assert _blockers(_cfg(tmp_path, "eval.format_failure_margin=0.2"), "readable answer") == []
    _write_eval(tmp_path, {"base": [None] * 8, "sft": [None] * 8})
    assert _blockers(cfg, "readable answer") == []


def test_the_demo_sft_that_answers_empty_strings_blocks_writing_whatever_the_recorded_rate(tmp_path):
    """What the demo SFT did at lr 2e-3 on 4 rows: an empty answer to all 8 MedQA questions."""
    cfg = _cfg(tmp_path)
    _write_eval(tmp_path, {"base": list("AAAAAAAB"), "sft": [None] * 8}, recorded_rate=0.0)
    [blocker] = _blockers(cfg, "readable answer")
    assert "100% of medqa (8 of 8)" in blocker and "the base to 0% (0 of 8)" in blocker


def test_without_the_bases_predictions_format_failures_cannot_be_compared(tmp_path):
    cfg = _cfg(tmp_path)
    _write_eval(tmp_path, {"base": list(GOLD), "sft": list(GOLD)})
    (tmp_path / "reports/eval/predictions/base.jsonl").unlink()
    [blocker] = _blockers(cfg, "base.jsonl")
    assert "is missing" in blocker and "format failures" in blocker


def test_format_failure_margin_is_validated(tmp_path):
    assert _cfg(tmp_path).eval.format_failure_margin == 0.10
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="format_failure_margin"):
            _cfg(tmp_path, f"eval.format_failure_margin={bad}")


def _write_sft(root, cfg, logged: list, recorded: list | None = None):
    """SFT metrics (status ok) with its eval_loss_curve, and the trainer's own log it points at."""
    state_rel = "checkpoints/sft/final/trainer_state.json"
    history = [{"step": s, "loss": 2.0}for s, _ in logged] + [{"step": s, "eval_loss": v} for s, v in logged]
    ev.atomic_write_json(root / state_rel, {"global_step": logged[-1][0] if logged else 0, "log_history": history})
    ev.atomic_write_json(root / REGISTRY["sft"].evidence(cfg), {
        "stage": "sft", "status": "ok", "trainer_state_file": state_rel,
        "eval_loss_curve": [list(p) for p in (logged if recorded is None else recorded)]})


def test_sft_eval_loss_ending_above_its_start_blocks_writing(tmp_path):
    cfg = _cfg(tmp_path)
    _write_sft(tmp_path, cfg, [(0, 3.1), (3, 2.9), (6, 3.4)])
    [blocker] = _blockers(cfg, "held-out eval loss")
    assert "ended at 3.4000 (step 6)" in blocker and "started, 3.1000 (step 0)" in blocker
    _write_sft(tmp_path, cfg, [(0, 3.1), (3, 2.9), (6, 3.0)])
    assert _blockers(cfg, "eval loss") == []
    # a preference method holds out no eval rows: its empty eval_loss_curve is no blocker (the demo Day-1's DPO)
    ev.atomic_write_json(tmp_path / REGISTRY["dpo"].evidence(cfg),
                         {"stage": "dpo", "status": "ok", "eval_loss_curve": [], "trainer_state_file": "-"})
    assert _blockers(cfg, "eval loss") == [] and _blockers(cfg, "dpo") == []


def test_an_edited_eval_loss_curve_is_not_believed(tmp_path):
    cfg = _cfg(tmp_path)
    _write_sft(tmp_path, cfg, [(0, 3.1), (6, 3.4)], recorded=[(0, 3.1), (6, 2.0)])
    [blocker] = _blockers(cfg, "eval_loss_curve")
    assert "does not match the eval losses in the trainer's own log" in blocker


def test_a_single_eval_loss_cannot_show_a_decrease(tmp_path):
    cfg = _cfg(tmp_path)
    _write_sft(tmp_path, cfg, [(6, 2.0)])
    [blocker] = _blockers(cfg, "eval loss")
    assert "logged 1 held-out eval loss(es)" in blocker and "sft.eval_steps" in blocker

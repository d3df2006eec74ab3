"""SEEDS=1,2 on the tiny tier (issue 12 §6), on a copy of the session's tiny Day-1 (tests/conftest.py), whose main
seed is 42: so three seeds in all (42, 1, 2). Each extra seed re-runs DPO, SimPO, KTO and ORPO from the main SFT
final and is scored on the main eval's ids; the gate checks every replicate with the main stages' checks; the main
run's files stay byte for byte what the run without SEEDS wrote; a re-run trains nothing; a tampered replicate
checkpoint fails the gate.

Run: .venv/bin/python -m pytest -q -m slow tests/e2e/test_seed_replicates.py
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline import gate as G
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline.stages import REGISTRY

# the shared tiny Day-1 (when this module builds it) and the replicates' training count against the first test
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

NEW = ("checkpoints/seeds/", "reports/training/seeds/", "reports/eval/seeds/", "reports/eval/seeds.",
       "reports/eval_seeds.md", "reports/logs/", ".pipeline.lock")   # what SEEDS adds (and the logs, the lock)


def files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seeded(tiny_day1, tmp_path_factory):
    """The tiny Day-1 (no SEEDS), copied, then `SEEDS=1,2 run all` on the copy: (root, files before, seconds)."""
    _, backup, env = tiny_day1
    root = tmp_path_factory.mktemp("seeds") / "root"
    shutil.copytree(backup, root)
    before = files(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_ROOT", str(root))
        mp.setenv("SEEDS", "1,2")
        for k in ("MODEL_TIER", "HF_HUB_OFFLINE"):
            mp.setenv(k, env[k])
        t0 = time.monotonic()
        assert main(["run", "all"]) == 0
        seconds = time.monotonic() - t0
    print(f"\nSEEDS=1,2 run all on the tiny Day-1: {seconds:.1f} s")
    return root, before, seconds


def gate(root: Path, seeds: str = "1,2") -> dict:
    return G.evaluate(load_config(tier="tiny", env={"PIPELINE_ROOT": str(root), "SEEDS": seeds}))


def test_both_replicates_are_trained_scored_summarised_and_checked_by_the_gate(seeded):
    root, _, _ = seeded
    aligned = REGISTRY.aligned
    for seed in (1, 2):
        for m in aligned:
            doc = json.loads((root / f"reports/training/seeds/{seed}/{m}_metrics.json").read_text())
            assert doc["status"] == "ok" and doc["stage"] == f"{m}@seed{seed}"
            assert doc["checkpoint_dir"] == f"checkpoints/seeds/{seed}/{m}/final"
            assert doc["start_checkpoint"]["dir"] == "checkpoints/layer_b/tiny_sft/final"
        scored = json.loads((root / f"reports/eval/seeds/{seed}/eval.json").read_text())
        main_ids = json.loads((root / "reports/eval/eval_default.json").read_text())["sets"]
        assert scored["status"] == "ok" and sorted(scored["results"]) == sorted(aligned)
        assert all(scored["results"][m][s]["question_ids"] == main_ids[s]["question_ids"] for m in aligned
                   for s in main_ids)
    summary = json.loads((root / "reports/eval/seeds.json").read_text())
    assert summary["status"] == "ok" and summary["main_seed"] == 42 and summary["extra_seeds"] == [1, 2]
    entry = summary["seeds"]["dpo"]["medqa"]
    assert entry["n_seeds"] == 3 and set(entry["per_seed"]) == {"42", "1", "2"}
    assert "mean ± sd across seeds" in (root / "reports/eval_seeds.md").read_text()
    verdict = gate(root)
    assert verdict["strict_pass"] is True, verdict["failed"]
    ids = {c["id"] for c in verdict["checks"] if c["passed"]}
    for seed in (1, 2):
        for m in aligned:
            assert {f"{m}@seed{seed}.{k}" for k in ("checkpoint", "loads", "curve", "steps", "invariants",
                                                     "from_sft")} <= ids
        assert {f"dpo@seed{seed}.reference", f"kto@seed{seed}.reference", f"eval@seed{seed}.numbers"} <= ids
    assert "seeds.summary" in ids


def test_the_main_run_is_byte_identical_to_the_run_without_seeds(seeded):
    root, before, _ = seeded
    after = files(root)
    changed = sorted(rel for rel in before if not rel.startswith(NEW) and after.get(rel) != before[rel])
    assert changed == [], changed
    added = sorted(rel for rel in after if rel not in before and not rel.startswith(NEW))
    assert added == [], added


def test_a_rerun_retrains_nothing_and_a_tampered_replicate_fails_the_gate(seeded, monkeypatch, capsys):
    root, _, _ = seeded
    evidence = {rel: data for rel, data in files(root).items() if rel.endswith(".json") and "logs" not in rel}
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    monkeypatch.setenv("SEEDS", "1,2")
    capsys.readouterr()
    assert main(["run", "all"]) == 0
    out = capsys.readouterr().out
    assert "dpo@seed2: up to date" in out and "eval@seed1: up to date" in out, out[-2000:]
    assert {rel: data for rel, data in files(root).items() if rel in evidence} == evidence
    target = root / "checkpoints/seeds/1/dpo/final/adapter_model.safetensors"
    original = target.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    try:
        verdict = gate(root)
        assert verdict["strict_pass"] is False and "dpo@seed1.checkpoint" in verdict["failed"], verdict["failed"]
        assert not any(f.startswith(("dpo.", "sft.", "kto@seed2.")) for f in verdict["failed"]), verdict["failed"]
    finally:
        target.write_bytes(original)
    assert gate(root)["strict_pass"] is True

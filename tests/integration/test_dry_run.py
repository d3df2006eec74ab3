"""The dry run: validates data, tokenizer and plan, trains nothing, never touches checkpoints/.

Run: .venv/bin/python -m pytest -x -q tests/integration/test_dry_run.py
"""
from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pipeline.stages import REGISTRY
from pipeline import engine
from pipeline import evidence as ev
from pipeline.settings import REPO, load_config

SFT = REPO / "data/medicalgpt_medical_sft_zh_1k/medical_sft_1K_format.jsonl"
PREFS = REPO / "data/medicalgpt_medical_reward_zh_100/test.json"
MEDQA = REPO / "data/medqa_usmle_4opt_test/test.jsonl"
EVIDENCE = "reports/migration/dry_run.json"


def dry_run(root, *overrides) -> tuple[int, dict | None, str]:
    out = io.StringIO()
    code = engine.run(["all"], load_config(overrides=list(overrides)), Console(file=out, width=250), REGISTRY)
    return code, ev.read_json(root / EVIDENCE), out.getvalue()


@pytest.fixture
def dry_env(tiny_env, monkeypatch):
    monkeypatch.setenv("DRY_RUN", "true")
    return tiny_env


def test_tiny_dry_run_records_counts_and_a_leaked_eval_question_and_creates_no_checkpoint(dry_env, tmp_path):
    leaked = json.loads(MEDQA.read_text().splitlines()[2])["question"]
    pairs = [json.loads(line) for line in PREFS.read_text().splitlines()[:8]]
    pairs[5]["question"] = "  " + leaked.replace(" ", "  ")        # same text after whitespace normalisation
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))

    code, doc, out = dry_run(dry_env, f"data.preference_path={prefs}")

    assert code == 0, out
    assert doc["status"] == "dry_run" and "nothing was trained" in doc["reason"]
    assert not (dry_env / "checkpoints").exists()
    assert not (dry_env / "reports/training").exists()
    assert doc["splits"] == {"sft_train": 96, "sft_eval": 8, "judge_heldout": 4, "preference_pairs": 8, "kto_rows": 16}
    assert doc["data"]["sft"]["n_rows"] == 1000 and doc["data"]["sft"]["sha256"] == ev.sha256_file(SFT)
    assert doc["data"]["preferences"]["sha256"] == ev.sha256_file(prefs)
    assert doc["overlap"]["medqa"]["n_overlap"] == 1 and doc["overlap"]["cmmlu"]["n_overlap"] == 0
    assert any(w.startswith("medqa: 1 of") for w in doc["warnings"])
    assert doc["tokenizer"]["checked"] and doc["tokenizer"]["rows_checked"] == 3
    subs = doc["tokenizer"]["sft_tokens"]["by_substage"]
    assert [s["max_length"] for s in subs] == [64, 128] and subs[0]["rows_truncated"] >= subs[1]["rows_truncated"]
    assert doc["training_plan"]["sft"]["max_steps"] == 40 and doc["would_train"] is True
    assert doc["length_bias"]["n_pairs"] == 8
    assert ev.validate("dry_run", doc) == []


def test_a_malformed_sft_row_fails_with_file_and_line_and_writes_no_dry_run_evidence(dry_env, tmp_path):
    lines = SFT.read_text(encoding="utf-8").splitlines()[:30]
    row = json.loads(lines[6])
    del row["conversations"][1]["value"]
    lines[6] = json.dumps(row, ensure_ascii=False)
    bad = tmp_path / "bad_sft.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")

    code, doc, out = dry_run(dry_env, f"data.sft_path={bad}")

    assert code == 1
    assert doc["status"] == "failed"
    assert f"{bad}:7" in doc["reason"] and "conversations[1].value" in doc["reason"]
    assert not (dry_env / "checkpoints").exists()


def test_7b_on_a_cpu_succeeds_without_checking_the_tokenizer_or_touching_the_hub(dry_env, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the dry run tried to download from the hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    monkeypatch.setenv("MODEL_TIER", "7b")

    code, doc, out = dry_run(dry_env)

    assert code == 0, out
    assert doc["status"] == "dry_run" and doc["model_tier"] == "7b"
    assert doc["tokenizer"]["checked"] is False
    assert doc["tokenizer"]["note"].startswith("tokenizer not checked: the 7b tier would not be trained here")
    assert "tokenizer not checked" in doc["reason"] and "7b tier is not feasible here" in doc["reason"]
    assert doc["would_train"] is False and doc["plan"]["feasible"] is False
    assert doc["model"] == {"base": "Qwen/Qwen2.5-7B-Instruct", "source": "hub", "found": None,
                            "weight_files": [], "weights_gb": None}
    assert doc["splits"]["sft_train"] == 1000 - 30 - 50
    assert not (dry_env / "checkpoints").exists() and not (dry_env / ".cache").exists()


def test_dry_run_is_a_mode_for_every_target_and_run_sft_trains_nothing(dry_env):
    """`DRY_RUN=true python -m pipeline run sft` trained for real: DRY_RUN only changed what `all` meant."""
    out = io.StringIO()
    code = engine.run(["sft"], load_config(), Console(file=out, width=250), REGISTRY)
    assert code == 0, out.getvalue()
    assert not (dry_env / "checkpoints").exists()
    assert not (dry_env / REGISTRY["sft"].evidence(load_config())).exists()
    assert ev.read_json(dry_env / EVIDENCE)["status"] == "dry_run"
    assert "dry run sft" in out.getvalue() and "would run" in out.getvalue()


def test_a_lora_rank_beyond_the_models_width_fails_the_dry_run_naming_the_key(dry_env):
    """The tiny model's k_proj/v_proj are 32 wide (2 KV heads x 16): lora.r=48 passed the config and the dry run."""
    code, doc, out = dry_run(dry_env, "lora.r=48")
    assert code == 1 and doc["status"] == "failed"
    assert "lora.r=48 exceeds the width of k_proj (32)" in doc["reason"] and "Traceback" not in out
    assert not (dry_env / "checkpoints").exists()


@pytest.mark.slow   # two dry runs: make test's time is kept for what it had
def test_the_dry_run_prints_the_timeline_of_an_up_to_date_preflight_and_runs_again_when_it_changes(dry_env):
    """A preflight written for this config and this gpu_check (its fingerprint now): the dry run prints its
    predicted timeline; preflight.json is one of the dry run's inputs, so a new preflight re-runs it."""
    code, doc, _ = dry_run(dry_env)
    assert code == 0 and doc["predicted_timeline"]["lines"] == []
    assert "make preflight" in doc["predicted_timeline"]["note"]
    cfg = load_config()
    fp, _ = engine.fingerprint(REGISTRY["preflight"], cfg, REGISTRY)
    ev.atomic_write_json(dry_env / "reports/migration/preflight.json", {
        "stage": "preflight", "status": "ok", "fingerprint": fp, "outputs": {}, "predicted_total_s": 90.0,
        "predicted_cost": None, "stages": {m: {"predicted_s": 10.0} for m in REGISTRY.methods},
        "eval": {"predicted_s": 30.0}, "judge": {"predicted_s": 0.0}})
    code, doc, out = dry_run(dry_env)
    timeline = doc["predicted_timeline"]
    assert code == 0 and timeline["evidence"] == "reports/migration/preflight.json"
    assert [line.split()[0] for line in timeline["lines"]] == [*REGISTRY.methods, "eval", "judge", "total"]
    assert "predicted: total" in out and timeline["predicted_total_s"] == 90.0

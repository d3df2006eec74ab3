"""Each TRL trainer on the tiny tier (CPU): curves go down, steps reach the plan, evidence validates,
checkpoints re-hash; resume after kill -9; injected OOM; honest skips; a tampered SFT final is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import evidence as ev
from pipeline.__main__ import main

REPO = Path(__file__).resolve().parents[2]
SFT_FINAL = "checkpoints/layer_b/tiny_sft/final"
SFT_METRICS = "reports/training/layer_b_tiny_sft_metrics.json"
METRICS = {"sft": "layer_b_tiny_sft_metrics.json", "dpo": "dpo_metrics.json",
           "simpo": "simpo_metrics.json", "kto": "kto_metrics.json"}


def metrics(root: Path, stage: str) -> dict:
    return json.loads((root / "reports/training" / METRICS[stage]).read_text())


def went_down(curve) -> bool:
    losses = [v for _, v in curve]
    n = max(1, len(losses) // 3)
    return sum(losses[-n:]) / n < sum(losses[:n]) / n


@pytest.fixture
def trained(day1_env):
    """The session's real tiny Day-1 (tests/conftest.py), restored after each test."""
    return day1_env, None


@pytest.mark.parametrize("stage", ["sft", "dpo", "simpo", "kto"])
def test_trainer_reaches_plan_and_learns(trained, stage):
    root, _ = trained
    m = metrics(root, stage)
    assert m["status"] == "ok" and m["skipped"] is False
    assert ev.validate(stage, m) == []
    assert m["global_step"] == m["planned_max_steps"]
    assert len(m["loss_curve"]) >= 3 and went_down(m["loss_curve"]), m["loss_curve"]
    final = root / m["checkpoint_dir"]
    assert ev.sha256_tree(final) == m["checkpoint_files"]
    state = json.loads((root / m["trainer_state_file"]).read_text())
    assert [[e["step"], e["loss"]] for e in state["log_history"] if "loss" in e] == m["loss_curve"]
    assert m["precision"]["dtype"] == "fp32" and m["precision"]["quantization"] is None
    assert (root / f"reports/figures/{stage}_loss.png").is_file()
    assert (root / f"reports/logs/{stage}_full.log").read_text().count("=====") >= 2


def test_sft_curriculum_and_eval_split(trained):
    m = metrics(trained[0], "sft")
    assert [c["reached_step"] for c in m["curriculum"]] == [c["planned_step"] for c in m["curriculum"]] == [20, 40]
    assert m["eval_loss_curve"], "the held-out split must give an eval_loss curve"
    assert set(m["data"]["eval_ids"]).isdisjoint(m["data"]["judge_heldout_ids"])


@pytest.mark.parametrize("stage", ["dpo", "simpo", "kto"])
def test_alignment_starts_from_sft_final(trained, stage):
    root, _ = trained
    m, sft = metrics(root, stage), metrics(root, "sft")
    assert m["start_checkpoint"] == {"dir": sft["checkpoint_dir"], "checkpoint_sha256": sft["checkpoint_sha256"]}
    assert m["data"]["length_bias"]["chosen_mean_chars"] > m["data"]["length_bias"]["rejected_mean_chars"]
    assert m["final_reward_metrics"], "TRL's reward metrics must be recorded"


def test_rerun_is_up_to_date_and_loads_no_model(trained, monkeypatch, capsys):
    from pipeline import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a no-op run loaded a model"))
    assert main(["run", "sft", "dpo", "simpo", "kto"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 5   # the four and gpu_check (the same machine: no new probe)
    assert all(f"{s}: up to date" in out for s in ("gpu_check", "sft", "dpo", "simpo", "kto"))


def test_tampered_sft_final_is_refused(trained, tmp_path):
    root, _ = trained
    adapter = root / metrics(root, "sft")["checkpoint_dir"] / "adapter_model.safetensors"
    original = adapter.read_bytes()
    adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    assert main(["run", "dpo", "--force", "--no-deps"]) == 1
    m = metrics(root, "dpo")
    assert m["status"] == "failed" and "does not match the hashes" in m["reason"]
    assert (root / "reports/training/dpo_metrics.previous.json").is_file()


def test_injected_oom_halves_batch_and_doubles_accumulation(tmp_path, monkeypatch):
    for k, v in {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1",
                 "MEDLLM_INJECT_OOM_AT_STEP": "5"}.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "sft", "sft.max_steps=12", "sft.curriculum=[]", "sft.save_steps=4"]) == 0
    m = metrics(tmp_path, "sft")
    assert m["global_step"] == 12
    assert [(r["batch_size"], r["grad_acc"], r["step"]) for r in m["oom_retries"]] == [(2, 2, 5)]
    assert m["final_batch_size"] * m["final_grad_acc"] == 4   # the effective batch is unchanged


def test_oom_at_batch_one_fails_with_options(tmp_path, monkeypatch):
    for k, v in {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1",
                 "MEDLLM_INJECT_OOM_AT_STEP": "2", "BATCH_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "sft", "sft.max_steps=4", "sft.curriculum=[]"]) == 1
    m = metrics(tmp_path, "sft")
    assert m["status"] == "failed" and "QLoRA" in m["reason"] and "max_length" in m["reason"]


def test_gpu_tier_on_cpu_is_skipped_without_download(tmp_path, monkeypatch):
    for k, v in {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "7b", "HF_HUB_OFFLINE": "1",
                 "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "sft", "dpo", "simpo", "kto"]) == 0
    for stage, name in [("sft", "layer_b_qwen25_7b_sft_metrics.json"), ("dpo", "dpo_metrics.json")]:
        m = json.loads((tmp_path / "reports/training" / name).read_text())
        assert m["status"] == "skipped" and m["skipped"] is True and m["reason"]
    assert "CUDA" in json.loads((tmp_path / "reports/training/layer_b_qwen25_7b_sft_metrics.json").read_text())["reason"]
    assert not (tmp_path / "checkpoints").exists() and not any((tmp_path / "hf").rglob("*.safetensors"))
    monkeypatch.setenv("ALLOW_SKIP_TRAINING", "false")
    assert main(["run", "sft"]) == 1
    m = json.loads((tmp_path / "reports/training/layer_b_qwen25_7b_sft_metrics.json").read_text())
    assert m["status"] == "failed" and "ALLOW_SKIP_TRAINING=false" in m["reason"]


def test_force_skip_training_is_evidence(tmp_path, monkeypatch):
    for k, v in {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1",
                 "FORCE_SKIP_TRAINING": "true"}.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "sft"]) == 0
    m = metrics(tmp_path, "sft")
    assert m["status"] == "skipped" and "FORCE_SKIP_TRAINING" in m["reason"]


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_kill_minus_9_then_resume_gives_one_continuous_curve(tmp_path):
    env = {**os.environ, "PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1"}
    env.pop("MEDLLM_INJECT_OOM_AT_STEP", None)
    args = ["sft.max_steps=80", "sft.curriculum=[]", "sft.save_steps=10", "sft.eval_steps=40"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "sft", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "checkpoints/layer_b/tiny_sft"
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-20" / "trainer_state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-20").exists(), "the first checkpoints were never written"
    assert not (out / "final").exists(), "the run finished before the kill; make it longer"
    assert (tmp_path / "reports/.incomplete/sft.marker").exists()
    assert not (tmp_path / "reports/training" / METRICS["sft"]).exists()   # nothing marked ok too early
    env_run = subprocess.run([sys.executable, "-m", "pipeline", "run", "sft", *args], cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert env_run.returncode == 0, env_run.stdout[-2000:]
    m = metrics(tmp_path, "sft")
    assert m["global_step"] == 80 and m["resumed_from"].startswith("checkpoint-")
    assert [s for s, _ in m["loss_curve"]] == list(range(1, 81))   # one continuous series, no gap, no repeat


def test_a_failed_attempt_with_other_settings_loses_no_finished_checkpoint(trained, capsys):
    """Issue 14: a run that changed SFT's fingerprint and then failed had moved the finished SFT folder to .stale;
    the re-run with the original config deleted that .stale and trained from step 0 (hours on a 7B)."""
    root, _ = trained
    final = root / SFT_FINAL
    before = ev.sha256_tree(final)
    assert main(["run", "sft", "sft.trl={no_such_field: 1}"]) != 0          # another fingerprint, fails at once
    kept = [p for p in (root / "checkpoints/layer_b").iterdir() if ".stale-" in p.name]
    assert len(kept) == 1 and ev.sha256_tree(kept[0] / "final") == before     # kept aside, not deleted
    assert main(["run", "sft", "sft.trl={no_such_field: 1}"]) != 0          # a second failure keeps it too
    capsys.readouterr()
    assert main(["run", "sft"]) == 0                                          # the original config again
    assert "restored" in capsys.readouterr().out
    assert ev.sha256_tree(final) == before                                    # the same final: not retrained
    assert json.loads((root / SFT_METRICS).read_text())["checkpoint_files"] == before


def test_prune_deletes_the_kept_aside_folders_and_says_what_it_freed(tiny_env, capsys):
    aside = tiny_env / "checkpoints/dpo-real-baseline.stale-0123456789abcdef/final"
    aside.mkdir(parents=True)
    (aside / "adapter_model.safetensors").write_bytes(b"x" * 2**20)
    keep = tiny_env / "checkpoints/dpo-real-baseline/final"
    keep.mkdir(parents=True)
    assert main(["prune"]) == 0
    out = capsys.readouterr().out
    assert "dpo-real-baseline.stale-0123456789abcdef" in out and "1.0 MiB" in out
    assert not aside.exists() and keep.is_dir()

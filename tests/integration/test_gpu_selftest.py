"""make gpu-selftest on the CPU: a few steps of each trainer on the tiny tier's model; the invariants,
real-token counts and one record per trainer; which model and configuration a GPU tier gets (the stand-in
without CUDA); the random-init build (in memory, nf4 too); scripts/device_selftest.sh end to end.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_gpu_selftest.py   (~40 s on 2 CPUs)
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import REGISTRY
from pipeline import evidence as ev
from pipeline import hardware, models
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline import training as T
from pipeline.stages import gpu_selftest as S
from pipeline.selftest_kit import TokenCounter

EVIDENCE = "reports/migration/gpu_selftest.json"
REPO = Path(__file__).resolve().parents[2]


def selftest(root, expect_rc: int = 0) -> dict:
    assert main(["run", "gpu_selftest"]) == expect_rc
    return json.loads((root / EVIDENCE).read_text())


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_each_trainer_takes_a_few_steps_at_its_longest_length_and_every_invariant_holds(tiny_env):
    doc = selftest(tiny_env)
    assert doc["status"] == "ok" and doc["skipped"] is False and ev.validate("gpu_selftest", doc) == []
    assert doc["device"] == "cpu" and doc["stand_in"] is False and doc["model"]["source"] == "tier"
    assert list(doc["trainers"]) == list(REGISTRY.methods)
    cfg = load_config()
    for kind, rec in doc["trainers"].items():
        tc = getattr(cfg, kind)
        assert rec["max_length"] == max([tc.max_length] + [c["max_length"] for c in tc.curriculum])
        assert rec["ok"] and all(rec["invariants"].values()) and rec["global_step"] == S.STEPS, rec
        # every row fills max_length, so a step's real tokens are exactly its sequences times the length
        per_step = rec["per_device_batch"] * rec["sequences_per_example"] * rec["max_length"]
        assert [s["tokens"] for s in rec["speed"]["per_step"]] == [per_step] * S.STEPS, rec["speed"]
        assert rec["speed"]["tokens_per_s"] > 0 and rec["speed"]["timed_steps"] == S.STEPS - 1
        assert rec["max_live_models"] == 1 and rec["live_models_after_release"] == 0
        assert rec["trainable_dtype"] == "float32"
        assert rec["memory"]["measured"] is False and rec["memory_vs_estimate"]["total_ratio"] is None
        assert rec["estimate"]["total_gb"] > rec["estimate"]["overhead_gb"] > 0
    assert doc["trainers"]["kto"]["trainer_batch"] >= 2
    assert not (tiny_env / "checkpoints" / ".gpu_selftest").exists(), "the scratch folders are removed"


def test_a_gpu_tier_plans_its_longest_length_and_first_batch_and_has_a_stand_in_without_cuda(tiny_env,
                                                                                            monkeypatch):
    monkeypatch.setenv("MODEL_TIER", "7b")
    cfg = load_config()
    sft, dpo, kto = (S.configuration(k, cfg) for k in ("sft", "dpo", "kto"))
    assert sft["max_length"] == 2048 and [c["max_length"] for c in cfg.sft.curriculum] == [512, 2048]
    assert dpo["max_length"] == 1024 and dpo["sequences_per_example"] == 2 and dpo["per_device_batch"] == 1
    assert kto["per_device_batch"] == 2 and kto["grad_acc_planned"] == 4 and kto["grad_acc"] == 1
    stand_in = S.pick_model(cfg, {"device": "cpu"})   # a GPU tier without CUDA (day1_run.sh runs it so)
    assert stand_in["stand_in"] is True and stand_in["source"] == "stand-in"
    assert "stands in for Qwen/Qwen2.5-7B-Instruct" in stand_in["name"] and Path(stand_in["base"]).is_dir()
    assert S.pick_model(load_config(tier="tiny"), {"device": "cpu"})["stand_in"] is False
    monkeypatch.setenv("MODEL_NAME", S.RANDOM_INIT)
    random = S.pick_model(load_config(), {"device": "cuda"})   # no download: the tiny tokenizer, 7b's shape
    assert random["source"] == S.RANDOM_INIT and random["shape"] == hardware.MODEL_SHAPES["7b"]
    assert random["stand_in"] is False and "Qwen2.5-7B" in random["name"]
    assert S.pick_model(load_config(), {"device": "cpu"})["stand_in"] is True   # never a 7B on a CPU


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_a_leaked_model_and_a_crash_each_fail_the_self_test_and_the_others_still_run(tiny_env, monkeypatch):
    real, leaked = S.build, []

    def build(kind, *args, **kwargs):
        if kind == "kto":
            raise RuntimeError("boom")
        trainer = real(kind, *args, **kwargs)
        if kind == "sft":
            leaked.append(trainer.model)   # still alive when dpo loads its model
        return trainer
    monkeypatch.setattr(S, "build", build)
    doc = selftest(tiny_env, expect_rc=1)
    assert doc["status"] == "failed" and ev.validate("gpu_selftest", doc) == []
    t = doc["trainers"]
    assert not t["sft"]["ok"] and not t["dpo"]["ok"] and not t["simpo"]["ok"]
    assert t["sft"]["invariants"]["released_after"] is False, "sft's model outlived its trainer"
    assert t["dpo"]["live_models_before_load"] == 1
    assert t["dpo"]["invariants"]["one_live_model_at_load"] is False
    assert t["dpo"]["global_step"] == S.STEPS, "a broken invariant is reported after the trainer still ran"
    assert t["kto"]["error"] == "RuntimeError: boom"
    assert "sft: invariant(s) failed: released_after" in doc["reason"]
    assert "dpo: invariant(s) failed: one_live_model_at_load, released_after" in doc["reason"]
    assert "kto: RuntimeError: boom" in doc["reason"]


def test_fp16_invariants_need_float32_adapters_and_a_grad_scaler_and_kto_a_batch_of_two():
    fp16 = {"precision": "fp16", "device": "cuda"}
    good = {"kind": "kto", "live_models_before_load": 0, "max_live_models": 1, "live_models_after_release": 0,
            "trainable_dtype": "float32", "grad_scaler": "GradScaler", "trainer_batch": 2,
            "global_step": S.STEPS, "losses": [11.9, 11.8], "speed": {"tokens": 4096}}
    assert all(S.invariants(good, fp16).values())
    broken = {**good, "trainable_dtype": "bfloat16", "grad_scaler": None, "trainer_batch": 1,
              "losses": [float("nan")]}
    failed = {k for k, ok in S.invariants(broken, fp16).items() if not ok}
    assert failed == {"trainable_float32_under_fp16", "grad_scaler_under_fp16", "kto_batch_at_least_2",
                      "loss_finite"}
    bf16_plan = {"precision": "bf16", "device": "cuda"}
    bf16 = {k for k, ok in S.invariants({**broken, "losses": [1.0]}, bf16_plan).items() if not ok}
    assert bf16 == {"kto_batch_at_least_2"}   # the fp16 rules apply to fp16 plans only
    rehearsal = {"precision": "fp16", "device": "cpu", "rehearsal": True}   # an fp16 GPU rehearsed on the CPU
    cpu = {k for k, ok in S.invariants({**broken, "losses": [1.0], "trainer_batch": 2}, rehearsal).items()
           if not ok}
    assert cpu == {"trainable_float32_under_fp16"}   # no loss scaler on a CPU; the fp32 adapters still


def test_tokens_are_counted_from_the_attention_mask_and_only_in_forwards_that_build_a_graph():
    import torch

    class Decoder(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return input_ids

    decoder = Decoder()
    counter = TokenCounter(decoder)
    decoder(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    with torch.no_grad():   # a reference (or KTO KL) forward
        decoder(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3))
    decoder(input_ids=torch.ones(1, 5, dtype=torch.long))   # padding-free: no mask, every token is real
    assert counter.total() == 3 + 5


@pytest.mark.parametrize("quantized", [False, True])
def test_the_random_init_model_is_built_in_memory_by_the_pipelines_loader(tmp_path, monkeypatch, quantized):
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.chdir(tmp_path)
    tok = models.load_tokenizer(models.build_tiny(tmp_path / "tiny", seed=0))
    config = S.random_config(hardware.MODEL_SHAPES["tiny"], tok)
    assert config.vocab_size == len(tok), "the vocabulary grows to the tokenizer's"
    plan = {"device": "cpu", "precision": "bf16" if quantized else "fp32", "attn_implementation": "sdpa",
            "quantization": "nf4" if quantized else None, "rehearsal": quantized}   # bitsandbytes' CPU nf4
    before, listing = AutoModelForCausalLM.__dict__.get("from_pretrained"), sorted(os.listdir(tmp_path))
    with S.random_weights(config):
        model = models.load_model(S.RANDOM_INIT, plan, trainable=True)
        assert models.live_models() >= 1
        layer = model.model.layers[0]
        assert type(layer.mlp.up_proj).__name__ == ("Linear4bit" if quantized else "Linear")
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.self_attn.q_proj.bias == 0)
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
        assert torch.isfinite(loss)
    assert AutoModelForCausalLM.__dict__.get("from_pretrained") is before, "the loader is restored"
    assert sorted(os.listdir(tmp_path)) == listing
    assert [p for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")] == []   # torch's cache


def test_older_transformers_get_the_gradient_checkpointing_names():
    @dataclasses.dataclass
    class Before:   # transformers 5.17: gradient_checkpointing only
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    @dataclasses.dataclass
    class After(Before):   # the rename, the old names kept as aliases
        activation_checkpointing: bool = False
        activation_checkpointing_kwargs: dict | None = None
    args = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False},
            "seed": 1}
    assert T.for_installed_transformers(args, Before) == {"gradient_checkpointing": True, "seed": 1,
                                                           "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    assert T.for_installed_transformers(args, After) == args
    assert T.for_installed_transformers(args) == args   # the pinned transformers 5.24 has the new names


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_the_device_script_runs_the_stage_and_writes_its_figures_flat_into_out(tiny_env):
    """scripts/device_selftest.sh as a lent GPU runs it, here on the tiny tier and the CPU (no wheels)."""
    out = tiny_env / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "SELFTEST_TIER": "tiny",
           "SELFTEST_MODEL": "", "SELFTEST_PLANS": "bf16 fp16", "SELFTEST_SITE": str(tiny_env / "site")}
    done = subprocess.run(["bash", "scripts/device_selftest.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "gpu_selftest_bf16.json",
                                                      "selftest.log", "summary.txt"]
    doc = json.loads((out / "gpu_selftest_bf16.json").read_text())
    assert doc["status"] == "ok" and doc["model_tier"] == "tiny"
    summary = (out / "summary.txt").read_text()
    assert "bf16: status ok" in summary and all(f"  {k}" in summary for k in REGISTRY.methods)
    assert "fp16: not run, the fp16 plan needs a CUDA device" in (out / "selftest.log").read_text()
    assert "trl 1.16" in (out / "environment.txt").read_text()

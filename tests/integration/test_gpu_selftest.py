"""make gpu-selftest on the CPU: a few steps of each trainer on the tiny tier's model and as a GPU tier's stand-in;
the invariants, real-token counts and one record per trainer; the random-init build (in memory, nf4 too).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_gpu_selftest.py   (~40 s on 2 CPUs)
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pipeline import evidence as ev
from pipeline import hardware, models
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline.stages import gpu_selftest as S

EVIDENCE = "reports/migration/gpu_selftest.json"


def selftest(root, expect_rc: int = 0) -> dict:
    assert main(["run", "gpu_selftest"]) == expect_rc
    return json.loads((root / EVIDENCE).read_text())


def test_each_trainer_takes_a_few_steps_at_its_longest_length_and_every_invariant_holds(tiny_env):
    doc = selftest(tiny_env)
    assert doc["status"] == "ok" and doc["skipped"] is False and ev.validate("gpu_selftest", doc) == []
    assert doc["device"] == "cpu" and doc["stand_in"] is False and doc["model"]["source"] == "tier"
    assert list(doc["trainers"]) == ["sft", "dpo", "simpo", "kto"]
    cfg = load_config()
    for kind, rec in doc["trainers"].items():
        tc = getattr(cfg, kind)
        assert rec["max_length"] == max([tc.max_length] + [c["max_length"] for c in tc.curriculum])
        assert rec["ok"] and all(rec["invariants"].values()) and rec["global_step"] == S.STEPS, rec
        # every row fills max_length, so the real tokens of a step are exactly the sequences times the length
        per_step = rec["per_device_batch"] * rec["grad_acc"] * rec["sequences_per_example"] * rec["max_length"]
        assert [s["tokens"] for s in rec["speed"]["per_step"]] == [per_step] * S.STEPS, rec["speed"]
        assert rec["speed"]["tokens_per_s"] > 0 and rec["speed"]["timed_steps"] == S.STEPS - 1
        assert rec["max_live_models"] == 1 and rec["trainable_dtype"] == "float32"
        assert rec["memory"]["measured"] is False and rec["memory_vs_estimate"]["total_ratio"] is None
        assert rec["estimate"]["total_gb"] > rec["estimate"]["overhead_gb"] > 0
    assert doc["trainers"]["kto"]["trainer_batch"] >= 2
    assert not (tiny_env / "checkpoints" / ".gpu_selftest").exists(), "the trainers' scratch folders are removed"


def test_a_gpu_tier_without_cuda_runs_on_the_stand_in_and_says_so(tiny_env, monkeypatch):
    monkeypatch.setenv("MODEL_TIER", "7b")
    short = [f"{k}.max_length=160" for k in ("dpo", "simpo", "kto")] + ["sft.curriculum=[]", "sft.max_length=160"]
    assert main(["run", "gpu_selftest", *short]) == 0   # the 7b tier's batches, shorter rows to keep the test quick
    doc = json.loads((tiny_env / EVIDENCE).read_text())
    assert doc["status"] == "ok" and doc["stand_in"] is True and doc["device"] == "cpu"
    assert doc["model"]["source"] == "stand-in" and "stands in for Qwen/Qwen2.5-7B-Instruct" in doc["model"]["name"]
    kto = doc["trainers"]["kto"]
    assert kto["per_device_batch"] == 2 and "raised to 2" in kto["batch_note"] and kto["invariants"]["kto_batch_at_least_2"]
    assert [s["tokens"] for s in kto["speed"]["per_step"]] == [2 * 160] * S.STEPS


def test_the_configuration_is_the_longest_planned_length_and_the_batch_training_starts_with(tiny_env, monkeypatch):
    monkeypatch.setenv("MODEL_TIER", "7b")
    cfg = load_config()
    sft, dpo, kto = (S.configuration(k, cfg) for k in ("sft", "dpo", "kto"))
    assert sft["max_length"] == 2048 and [c["max_length"] for c in cfg.sft.curriculum] == [512, 2048]
    assert dpo["max_length"] == 1024 and dpo["sequences_per_example"] == 2 and dpo["per_device_batch"] == 1
    assert kto["per_device_batch"] == 2 and kto["grad_acc_planned"] == 4 and kto["grad_acc"] == 1
    monkeypatch.setenv("MODEL_TIER", "tiny")
    plan = {"device": "cpu"}
    assert S.pick_model(load_config(tier="7b"), plan)["stand_in"] is True
    assert S.pick_model(load_config(tier="tiny"), plan)["stand_in"] is False


def test_a_leaked_model_and_a_crash_each_fail_the_self_test_and_the_other_trainers_still_run(tiny_env, monkeypatch):
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
    assert t["sft"]["ok"] and not t["dpo"]["ok"] and not t["simpo"]["ok"]
    assert t["dpo"]["live_models_before_load"] == 1 and t["dpo"]["invariants"]["one_live_model_at_load"] is False
    assert t["dpo"]["global_step"] == S.STEPS, "a broken invariant is reported after the trainer still ran"
    assert t["kto"]["error"] == "RuntimeError: boom"
    assert "dpo: invariant(s) failed: one_live_model_at_load" in doc["reason"] and "kto: RuntimeError: boom" in doc["reason"]


def test_fp16_invariants_need_float32_adapters_and_a_grad_scaler_and_kto_a_batch_of_two():
    fp16 = {"precision": "fp16"}
    good = {"kind": "kto", "live_models_before_load": 0, "max_live_models": 1, "trainable_dtype": "float32",
            "grad_scaler": "GradScaler", "trainer_batch": 2, "global_step": S.STEPS, "losses": [11.9, 11.8],
            "speed": {"tokens": 4096}}
    assert all(S.invariants(good, fp16).values())
    broken = {**good, "trainable_dtype": "bfloat16", "grad_scaler": None, "trainer_batch": 1, "losses": [float("nan")]}
    failed = {k for k, ok in S.invariants(broken, fp16).items() if not ok}
    assert failed == {"trainable_float32_under_fp16", "grad_scaler_under_fp16", "kto_batch_at_least_2", "loss_finite"}
    bf16 = {k for k, ok in S.invariants({**broken, "losses": [1.0]}, {"precision": "bf16"}).items() if not ok}
    assert bf16 == {"kto_batch_at_least_2"}   # the fp16 rules apply to fp16 plans only


def test_tokens_are_counted_from_the_attention_mask_and_only_in_forwards_that_build_a_graph():
    import torch

    class Decoder(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None):
            return input_ids

    decoder = Decoder()
    counter = S.TokenCounter(decoder)
    decoder(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    with torch.no_grad():   # a reference (or KTO KL) forward
        decoder(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3))
    decoder(input_ids=torch.ones(1, 5, dtype=torch.long))   # padding-free: no mask, every token is real
    assert counter.total() == 3 + 5


@pytest.mark.parametrize("quantized", [False, True])
def test_the_random_init_model_is_built_in_memory_through_the_pipelines_loader(tmp_path, monkeypatch, quantized):
    import tempfile

    import torch
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.chdir(tmp_path)
    tok = models.load_tokenizer(models.build_tiny(tmp_path / "tiny", seed=0))
    config = S.random_config(hardware.MODEL_SHAPES["tiny"], tok)
    assert config.vocab_size == len(tok), "the vocabulary grows to the tokenizer's"
    plan = {"device": "cpu", "precision": "bf16" if quantized else "fp32", "attn_implementation": "sdpa",
            "quantization": "nf4" if quantized else None, "rehearsal": quantized}   # bitsandbytes' CPU nf4
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.__dict__.get("from_pretrained")
    listing = sorted(os.listdir(tmp_path))
    with S.random_weights(config):
        model = models.load_model(S.RANDOM_INIT, plan, trainable=True)
        assert models.live_models() >= 1
        layer = model.model.layers[0]
        assert type(layer.mlp.up_proj).__name__ == ("Linear4bit" if quantized else "Linear")
        assert torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.self_attn.q_proj.bias == 0)
        loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
        assert torch.isfinite(loss)
    assert AutoModelForCausalLM.__dict__.get("from_pretrained") is before, "the loader is restored"
    assert sorted(os.listdir(tmp_path)) == listing and list(tmpdir.iterdir()) == []


def test_older_transformers_get_the_gradient_checkpointing_names(monkeypatch):
    import transformers

    @dataclasses.dataclass
    class TrainingArguments:   # transformers 5.17: no activation_checkpointing field yet
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None
    monkeypatch.setattr(transformers, "TrainingArguments", TrainingArguments)
    args = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}, "seed": 1}
    assert S.for_installed_transformers(args) == {"gradient_checkpointing": True, "seed": 1,
                                                   "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    monkeypatch.undo()
    assert S.for_installed_transformers(args) == args   # the installed one knows the new names

"""The invariants a GPU would enforce, asserted on the CPU (issue: the GPU tiers rehearsed on the CPU):
one live base model per process, one LR schedule across curriculum boundaries, KTO's per-device batch >= 2
(also after an OOM halving), float32 trainables under fp16, allocation failures that are RuntimeErrors,
a non-finite loss stops the stage, NPROC=1 pins one GPU, and an OOM on one DDP rank relaunches every rank.

Run: .venv/bin/python -m pytest -q tests/integration/test_invariants.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import REGISTRY
from pipeline import evidence as ev
from pipeline.__main__ import main
from pipeline.settings import REPO

METRICS = {m: Path(REGISTRY[m].evidence_path.format(slug="tiny")).name for m in REGISTRY.methods}


def metrics(root, stage):
    return json.loads((root / "reports/training" / METRICS[stage]).read_text())


@pytest.mark.parametrize("stage", REGISTRY.methods)
def test_one_live_model_in_every_training_stage(day1_env, stage):
    m = metrics(day1_env, stage)
    assert m["memory"]["max_live_models"] == 1, m["memory"]
    assert m["memory"]["peak_gb"] > 0 and m["memory"]["peak_kind"] == "cpu_peak_rss_of_process"
    assert m["precision"]["trainable_dtype"] == "float32"


def test_learning_rate_is_one_schedule_across_the_curriculum(day1_env):
    """tiny tier: curriculum 20 + 20 steps, linear decay, no warmup: the rate must fall at every step, with no
    restart at the boundary (before: sub-stage 1 decayed to 0 at step 20, sub-stage 2 jumped back up)."""
    m = metrics(day1_env, "sft")
    state = json.loads((day1_env / m["trainer_state_file"]).read_text())
    lrs = [(e["step"], e["learning_rate"]) for e in state["log_history"] if "learning_rate" in e]
    assert [s for s, _ in lrs] == list(range(1, 41))
    values = [v for _, v in lrs]
    assert all(b < a for a, b in zip(values, values[1:])), lrs
    assert values[19] > 0.4 * values[0]   # half-way through max_steps, not the end of a schedule


def test_kto_batch_of_one_is_raised_to_two_with_the_reason(day1_env):
    assert main(["run", "kto", "--force", "--no-deps", "kto.batch_size=1", "kto.grad_acc=4"]) == 0
    m = metrics(day1_env, "kto")
    assert m["status"] == "ok"
    assert m["batch"]["requested"] == {"per_device": 1, "grad_acc": 4}
    first = m["batch"]["attempts"][0]
    assert (first["per_device"], first["grad_acc"]) == (2, 2) and "KTO" in first["reason"]


def test_kto_oom_at_batch_two_gives_up_instead_of_halving_to_one(day1_env, monkeypatch):
    monkeypatch.setenv("MEDLLM_INJECT_OOM_AT_STEP", "2")
    assert main(["run", "kto", "--force", "--no-deps", "kto.batch_size=2", "kto.grad_acc=1"]) == 1
    m = metrics(day1_env, "kto")
    assert m["status"] == "failed" and "per-device batch 2" in m["reason"], m["reason"]


def test_allocation_failures_raised_as_runtime_error_are_retried():
    import torch
    from pipeline.training import is_oom
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_a_non_finite_loss_stops_the_stage_at_once():
    from types import SimpleNamespace
    from pipeline.engine import StageFailed
    from pipeline.settings import load_config
    from pipeline.training import make_callbacks
    cb = make_callbacks(load_config(env={"MODEL_TIER": "tiny"}), "sft", 10)[0]
    cb.on_log(SimpleNamespace(fp16=True), SimpleNamespace(global_step=3), None, logs={"loss": 1.5})
    with pytest.raises(StageFailed, match="fp16 overflow"):
        cb.on_log(SimpleNamespace(fp16=True), SimpleNamespace(global_step=4), None, logs={"loss": float("nan")})


def test_fp16_plans_train_float32_adapters_even_where_trl_casts_them_to_bf16(tmp_path):
    """TRL casts a quantized model's trainables to bf16 (trl/trainer/sft_trainer.py:908-911): GradScaler under
    fp16 has no bf16 kernel. The fix casts them back before the optimizer exists."""
    import torch
    from peft import LoraConfig, get_peft_model
    from pipeline import models
    tiny = models.build_tiny(tmp_path / "tiny")
    plan = {"device": "cpu", "precision": "fp16", "attn_implementation": "sdpa", "quantization": "nf4",
            "rehearsal": True}
    model = get_peft_model(models.load_model(tiny, plan, trainable=True),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)   # what TRL does
    assert models.trainable_dtype(model) == "bfloat16"
    assert models.fix_trainable_dtype(model, plan) == "float32"
    assert models.fix_trainable_dtype(model, {**plan, "precision": "bf16"}) == "float32"   # bf16 plans: untouched


@pytest.mark.parametrize("nproc, preset, want", [("1", None, "0"), ("2", None, None), ("1", "3", "3")])
def test_nproc_1_pins_one_gpu_before_cuda_starts(tiny_env, nproc, preset, want):
    """The Trainer wraps the model in nn.DataParallel over every visible GPU when one process sees several."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"NPROC": nproc}
    if preset:
        env["CUDA_VISIBLE_DEVICES"] = preset
    code = ("import os, sys; from pipeline.__main__ import main; main(['config']); "
            "print('PINNED', os.environ.get('CUDA_VISIBLE_DEVICES'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    line = [x for x in out.splitlines() if x.startswith("PINNED")][-1].split()
    assert line[1] == str(want)


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_oom_on_one_ddp_rank_relaunches_every_rank_with_half_the_batch(tiny_env):
    env = {**os.environ, "NPROC": "2", "MEDLLM_INJECT_OOM_AT_STEP": "3", "MEDLLM_INJECT_OOM_RANK": "1"}
    plan = ["sft.max_steps=6", "sft.batch_size=4", "sft.grad_acc=1", "sft.save_steps=2", "sft.eval_steps=6",
            "sft.curriculum=[]"]
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "sft", *plan], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    m = json.loads((tiny_env / "reports/training/layer_b_tiny_sft_metrics.json").read_text())
    assert m["status"] == "ok" and ev.validate("sft", m) == [] and m["global_step"] == 6
    assert [(r["batch_size"], r["grad_acc"]) for r in m["oom_retries"]] == [(2, 2)]
    assert "rank 1" in m["oom_retries"][0]["error"]
    assert [(a["per_device"], a["grad_acc"]) for a in m["batch"]["attempts"]] == [(4, 1), (2, 2)]
    assert [s for s, _ in m["loss_curve"]] == list(range(1, 7))


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_qlora_under_ddp_with_activation_checkpointing_off(tiny_env):
    """peft's k-bit preparation turned reentrant checkpointing on even when the config had it off, and DDP over a
    PeftModel searched for unused parameters: that pair fails under DDP. The rehearsal runs nf4 on the CPU."""
    env = {**os.environ, "REHEARSAL": "true", "MODEL_TIER": "14b", "NPROC": "2", "REHEARSAL_STEPS": "2",
           "GPU_PROBE_FILE": "configs/probes/v100x2_32g.json", "MIN_CUDA_MEM_GB_14B": "22"}
    args = ["sft.activation_checkpointing=false", "sft.curriculum=[]", "sft.max_length=256"]
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "sft", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    m = json.loads((tiny_env / "reports/training/layer_b_qwen25_14b_sft_metrics.json").read_text())
    assert m["status"] == "ok" and m["distributed"]["world_size"] == 2
    assert (m["precision"]["quantization"], m["precision"]["trainable_dtype"]) == ("nf4", "float32")
    assert m["global_step"] == 2

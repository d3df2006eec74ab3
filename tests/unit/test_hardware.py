"""The hardware plan on simulated machines (V100, A100, T4, CPU), the memory estimate, and the real probe here."""
import io
import json
import os
from pathlib import Path

import jsonschema
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pipeline import hardware as hw  # noqa: E402

MIN_MEM = {"7b": 18.0, "14b": 36.0}
LORA = {"lora_r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "optimizer": "adamw_torch", "seq_len": 2048, "batch": 1, "activation_checkpointing": True}
SCHEMAS = Path(hw.__file__).parent / "schemas"


def gpu(name, cap, total, free=None, bf16=None):
    return {"index": 0, "name": name, "capability": list(cap), "total_gb": total,
            "free_gb": total - 0.5 if free is None else free, "bf16": cap >= (8, 0) if bf16 is None else bf16}


def machine(*devices, flash_attn=False, bnb=True):
    devs = [dict(d, index=i) for i, d in enumerate(devices)]
    return {"cuda_available": bool(devs), "torch_version": "2.13.0", "torch_cuda_build": "12.8" if devs else None,
            "driver": "570.1" if devs else None, "devices": devs, "flash_attn": flash_attn, "bitsandbytes": bnb,
            "bitsandbytes_error": None if bnb else "RuntimeError: no libbitsandbytes_cuda", "nvidia_smi": {},
            "errors": []}


V100 = gpu("Tesla V100-SXM2-32GB", (7, 0), 32.0)
A100 = gpu("NVIDIA A100-SXM4-80GB", (8, 0), 80.0)
T4 = gpu("Tesla T4", (7, 5), 15.7, free=15.2)


def plan(probe, tier="7b", qlora=False, flash=True, nproc=1, **est):
    return hw.make_plan(probe, tier=tier, want_qlora=qlora, want_flash_attn=flash, min_mem_gb=MIN_MEM,
                        estimate_inputs={**LORA, **est}, nproc=nproc)


def test_v100_gets_fp16_sdpa_and_says_why():
    p = plan(machine(V100, flash_attn=True))
    assert (p["device"], p["precision"], p["bf16"], p["fp16"]) == ("cuda", "fp16", False, True)
    assert p["attn_implementation"] == "sdpa" and "Ampere" in p["attn_reason"]
    assert "pre-Ampere GPU (Tesla V100-SXM2-32GB, sm_70): bf16 off, fp16 on" in p["downgrades"]
    assert p["feasible"], p["feasible_reason"]


def test_dual_v100_uses_both_and_the_smaller_free_memory():
    p = plan(machine(V100, gpu("Tesla V100-SXM2-32GB", (7, 0), 32.0, free=20.0)), nproc=2)
    assert p["n_gpus"] == 2 and p["free_mem_gb"] == 20.0 and p["precision"] == "fp16"
    one = plan(machine(V100), nproc=2)
    assert one["n_gpus"] == 1 and any("NPROC=2" in d for d in one["downgrades"])


def test_a100_with_flash_attn_gets_bf16_and_flash_attention_2():
    p = plan(machine(A100, flash_attn=True))
    assert (p["precision"], p["bf16"], p["fp16"]) == ("bf16", True, False)
    assert p["attn_implementation"] == "flash_attention_2" and p["quantization"] is None
    assert p["feasible"] and p["downgrades"] == []


def test_a100_without_flash_attn_package_falls_back_to_sdpa_with_reason():
    p = plan(machine(A100, flash_attn=False))
    assert p["attn_implementation"] == "sdpa" and "not installed" in p["attn_reason"]


def test_a100_qlora_gets_nf4_and_sdpa():
    p = plan(machine(A100, flash_attn=True), qlora=True)
    assert p["quantization"] == "nf4" and p["attn_implementation"] == "sdpa"
    assert "4-bit" in p["attn_reason"]
    assert p["memory_estimate"]["weights_gb"] < plan(machine(A100))["memory_estimate"]["weights_gb"] / 2


def test_qlora_without_bitsandbytes_stays_16bit_and_says_so():
    p = plan(machine(A100, bnb=False), qlora=True)
    assert p["quantization"] is None and "bitsandbytes" in p["quant_reason"]
    assert any("bitsandbytes" in d for d in p["downgrades"])


def test_t4_is_infeasible_for_7b_with_the_numbers():
    p = plan(machine(T4), tier="7b")
    assert not p["feasible"]
    assert p["feasible_reason"] == "GPU 0 has 15.2 GB free, the 7b tier needs >= 18 GB (MIN_CUDA_MEM_GB_7B)"
    assert p["free_mem_gb"] == 15.2 and p["min_mem_gb"] == 18.0


def test_estimate_larger_than_free_memory_is_infeasible_even_above_the_minimum():
    p = plan(machine(gpu("NVIDIA A10", (8, 6), 24.0, free=19.0)), tier="7b", activation_checkpointing=False)
    assert p["memory_estimate"]["total_gb"] > 19.0
    assert not p["feasible"] and "19.0 GB free" in p["feasible_reason"] and "estimate" in p["feasible_reason"]


def test_cpu_gets_fp32_no_quantization_and_only_small_tiers():
    cpu = machine()
    p = plan(cpu, tier="7b", qlora=True)
    assert (p["device"], p["n_gpus"], p["precision"], p["quantization"]) == ("cpu", 0, "fp32", None)
    assert "no CUDA device" in p["quant_reason"]
    assert not p["feasible"] and p["feasible_reason"].startswith("no CUDA device: the 7b tier needs a GPU with >= 18 GB")
    for tier in ("tiny", "demo"):
        small = plan(cpu, tier=tier)
        assert small["feasible"] and small["min_mem_gb"] is None, small["feasible_reason"]


def test_cpu_torch_on_a_gpu_machine_names_the_fix():
    cpu = machine()
    cpu["nvidia_smi"] = {"available": True, "rows": [{"name": "Tesla V100-SXM2-32GB"}]}
    assert "CPU build" in plan(cpu, tier="7b")["feasible_reason"]


@pytest.mark.parametrize("tier", ["tiny", "demo", "7b", "14b"])
@pytest.mark.parametrize("quant", [None, "nf4"])
def test_estimate_parts_add_up_to_total(tier, quant):
    est = hw.estimate_memory(hw.MODEL_SHAPES[tier], precision="bf16", quantization=quant, **LORA)
    parts = ["weights_gb", "adapters_gb", "optimizer_gb", "gradients_gb", "activations_gb", "overhead_gb"]
    assert est["total_gb"] == pytest.approx(sum(est[k] for k in parts), abs=1e-6)
    assert all(est[k] >= 0 for k in parts) and est["assumptions"]


def test_estimate_is_plausible_and_responds_to_its_inputs():
    shape = hw.MODEL_SHAPES["7b"]
    bf16 = hw.estimate_memory(shape, precision="bf16", quantization=None, **LORA)
    assert 16 <= bf16["total_gb"] <= 30
    assert 13 < bf16["weights_gb"] < 15.5          # 7.62e9 params x 2 bytes
    nf4 = hw.estimate_memory(shape, precision="bf16", quantization="nf4", **LORA)
    assert nf4["weights_gb"] < bf16["weights_gb"] and nf4["total_gb"] < bf16["total_gb"]
    no_ckpt = hw.estimate_memory(shape, precision="bf16", quantization=None, **{**LORA, "activation_checkpointing": False})
    assert no_ckpt["activations_gb"] > 2 * bf16["activations_gb"]
    paged = hw.estimate_memory(shape, precision="bf16", quantization=None, **{**LORA, "optimizer": "paged_adamw_8bit"})
    assert paged["optimizer_gb"] == pytest.approx(bf16["optimizer_gb"] / 4, rel=0.01)
    big = hw.estimate_memory(hw.MODEL_SHAPES["14b"], precision="bf16", quantization=None, **LORA)
    assert big["total_gb"] > bf16["total_gb"]


def test_named_shapes_match_their_parameter_counts():
    for tier in ("7b", "14b", "demo"):
        shape = hw.MODEL_SHAPES[tier]
        assert hw.count_params(shape) == pytest.approx(shape["params"], rel=0.02), tier


def test_unknown_target_module_is_a_sentence():
    with pytest.raises(ValueError, match="lora.target_modules"):
        hw.estimate_memory(hw.MODEL_SHAPES["tiny"], precision="fp32", quantization=None,
                           **{**LORA, "target_modules": ["qkv"]})


def test_probe_on_this_machine_does_not_raise_and_plans_cpu():
    found = hw.probe()
    assert isinstance(found["cuda_available"], bool) and isinstance(found["devices"], list)
    if not found["cuda_available"]:                 # the CPU test box
        assert found["devices"] == [] and plan(found, tier="tiny")["device"] == "cpu"
    p = plan(found, tier="tiny")
    evidence = {"status": "ok", "probe": found, "plan": p, "messages": []}
    jsonschema.validate(evidence, json.loads((SCHEMAS / "gpu_check.schema.json").read_text()))


def test_probe_records_a_broken_nvidia_smi(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    smi = hw.probe()["nvidia_smi"]
    assert smi["available"] is False and "exited 9" in smi["error"] and "has failed" in smi["error"]


def test_probe_parses_nvidia_smi_rows(monkeypatch, tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, Tesla V100-SXM2-32GB, 32768, 32000, 535.104.05, 7.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found = hw.probe()
    assert found["driver"] == "535.104.05"
    assert found["nvidia_smi"]["rows"][0]["name"] == "Tesla V100-SXM2-32GB"


# ---------------------------------------------------------------- the two stage bodies, on a fake ctx
def fake_ctx(tmp_path, tier="tiny"):
    from types import SimpleNamespace

    from rich.console import Console

    from pipeline.settings import Config
    cfg = Config(tier=tier, root=str(tmp_path))
    cfg.runtime.hf_home = str(tmp_path / "hf")
    return SimpleNamespace(cfg=cfg, root=tmp_path, console=Console(file=io.StringIO()))


def test_gpu_check_on_this_machine_records_an_infeasible_gpu_tier_without_failing(tmp_path):
    from pipeline.stages import gpu_check
    out = gpu_check.run(fake_ctx(tmp_path, tier="7b"))
    jsonschema.validate({"status": "ok", **out}, json.loads((SCHEMAS / "gpu_check.schema.json").read_text()))
    if not out["probe"]["cuda_available"]:
        assert out["plan"]["feasible"] is False and any("NOT feasible" in m for m in out["messages"])


def test_gpu_bootstrap_fails_with_each_broken_check_named(tmp_path, monkeypatch):
    from pipeline.engine import StageFailed
    from pipeline.stages import gpu_bootstrap
    monkeypatch.setattr(gpu_bootstrap, "REQUIRED_IMPORTS", ("torch", "no_such_module_xyz"))
    monkeypatch.setattr(gpu_bootstrap, "DISK_NEED_GB", {"tiny": 10**9})
    with pytest.raises(StageFailed) as err:
        gpu_bootstrap.run(fake_ctx(tmp_path))
    msg = str(err.value)
    assert "import_no_such_module_xyz" in msg and "ModuleNotFoundError" in msg and "disk_space" in msg
    assert "import_torch" not in msg


def test_gpu_bootstrap_passes_and_warns_about_a_readable_env_file(tmp_path, monkeypatch):
    from pipeline.stages import gpu_bootstrap
    monkeypatch.setattr(gpu_bootstrap, "REQUIRED_IMPORTS", ("torch", "bitsandbytes"))
    env = tmp_path / ".env"
    env.write_text("OPENAI_API_KEY=sk-test\n")
    env.chmod(0o644)
    out = gpu_bootstrap.run(fake_ctx(tmp_path))
    jsonschema.validate({"status": "ok", **out}, json.loads((SCHEMAS / "gpu_bootstrap.schema.json").read_text()))
    assert out["env_file"] == {"path": str(env), "present": True, "mode": "0644", "private": False}
    assert any("chmod 600" in w for w in out["warnings"])
    assert all(c["writable"] for c in out["cache_dirs"]) and (tmp_path / "hf" / "hub").is_dir()
    assert out["disk"]["shortfall_gb"] == 0 and "sk-test" not in json.dumps(out)
    env.chmod(0o600)
    assert not any("chmod" in w for w in gpu_bootstrap.run(fake_ctx(tmp_path))["warnings"])

"""The hardware plan on simulated and recorded machines (V100, A100, T4, CPU), the memory estimate, the
rehearsal plan, and the real probe here."""
import io
import json
import os
from pathlib import Path

import jsonschema
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pipeline.stages import REGISTRY
from pipeline import hardware as hw  # noqa: E402
from pipeline import evidence as ev  # noqa: E402

MIN_MEM = {"7b": 18.0, "14b": 36.0}
LORA = {"lora_r": 16,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "optimizer": "adamw_torch", "seq_len": 2048, "batch": 1, "activation_checkpointing": True}
SCHEMAS = Path(hw.__file__).parent / "schemas"


def gpu(name, cap, total, free=None, bf16=None):
    return {"index": 0, "name": name, "capability": list(cap), "total_gb": total,
            "free_gb": total - 0.5 if free is None else free, "bf16": cap >= (8, 0) if bf16 is None else bf16}


def machine(*devices, flash_attn=False, bnb=True):
    devs = [dict(d, index=i) for i, d in enumerate(devices)]
    return {"cuda_available": bool(devs), "torch_version": "2.13.0",
            "torch_cuda_build": "12.8" if devs else None, "driver": "570.1" if devs else None,
            "devices": devs, "flash_attn": flash_attn, "bitsandbytes": bnb,
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


def test_a100_qlora_keeps_flash_attention_2():
    # transformers casts the fp32 queries of a k-bit model back to its dtype for flash-attn
    # (transformers/integrations/flash_attention.py:12-22): FA2 and nf4 go together
    p = plan(machine(A100, flash_attn=True), qlora=True)
    assert p["quantization"] == "nf4" and p["attn_implementation"] == "flash_attention_2"
    assert p["downgrades"] == []
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
    assert not p["feasible"]
    assert p["feasible_reason"].startswith("no CUDA device: the 7b tier needs a GPU with >= 18 GB")
    for tier in ("tiny", "demo"):
        small = plan(cpu, tier=tier)
        assert small["feasible"] and small["min_mem_gb"] is None, small["feasible_reason"]


def test_cpu_torch_on_a_gpu_machine_names_the_fix():
    cpu = machine()
    cpu["nvidia_smi"] = {"available": True, "rows": [{"name": "Tesla V100-SXM2-32GB"}]}
    assert "CPU build" in plan(cpu, tier="7b")["feasible_reason"]


@pytest.mark.parametrize("tier", ["tiny", "demo", "7b", "14b"])
@pytest.mark.parametrize("quant", [None, "nf4"])
@pytest.mark.parametrize("stage", ["sft", "dpo", "simpo", "kto"])
def test_estimate_parts_add_up_to_total(tier, quant, stage):
    est = hw.estimate_memory(hw.MODEL_SHAPES[tier], precision="bf16", quantization=quant, stage=stage, **LORA)
    parts = ["weights_gb", "kbit_upcast_gb", "adapters_gb", "optimizer_gb", "gradients_gb", "activations_gb",
             "loss_head_gb", "overhead_gb"]
    assert est["total_gb"] == pytest.approx(sum(est[k] for k in parts), abs=1e-6)
    assert all(est[k] >= 0 for k in parts) and est["assumptions"]


def test_estimate_is_plausible_and_responds_to_its_inputs():
    shape = hw.MODEL_SHAPES["7b"]
    bf16 = hw.estimate_memory(shape, precision="bf16", quantization=None, **LORA)
    assert 16 <= bf16["total_gb"] <= 30
    assert 13 < bf16["weights_gb"] < 15.5          # 7.62e9 params x 2 bytes
    nf4 = hw.estimate_memory(shape, precision="bf16", quantization="nf4", **LORA)
    assert nf4["weights_gb"] < bf16["weights_gb"] and nf4["total_gb"] < bf16["total_gb"]
    no_ckpt = hw.estimate_memory(shape, precision="bf16", quantization=None,
                                 **{**LORA, "activation_checkpointing": False})
    assert no_ckpt["activations_gb"] > 2 * bf16["activations_gb"]
    paged = hw.estimate_memory(shape, precision="bf16", quantization=None,
                               **{**LORA, "optimizer": "paged_adamw_8bit"})
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
    jsonschema.validate(evidence, ev.schema_file("gpu_check"))


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
    from pipeline.stages import REGISTRY
    return SimpleNamespace(cfg=cfg, root=tmp_path, console=Console(file=io.StringIO()), registry=REGISTRY)


def test_gpu_check_on_this_machine_records_an_infeasible_gpu_tier_without_failing(tmp_path):
    from pipeline.stages import gpu_check
    out = gpu_check.run(fake_ctx(tmp_path, tier="7b"))
    jsonschema.validate({"status": "ok", **out}, ev.schema_file("gpu_check"))
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
    from pipeline import settings
    monkeypatch.setattr(gpu_bootstrap, "REQUIRED_IMPORTS", ("torch", "bitsandbytes"))
    (tmp_path / "repo").mkdir()
    env = tmp_path / "repo" / ".env"
    monkeypatch.setattr(settings, "DOTENV", env)
    env.write_text("OPENAI_API_KEY=sk-test\n")
    env.chmod(0o644)
    out = gpu_bootstrap.run(fake_ctx(tmp_path))
    schema = ev.schema_file("gpu_bootstrap")
    jsonschema.validate({"status": "ok", **out}, schema)
    assert out["env_file"] == {"path": str(env), "present": True, "mode": "0644", "private": False}
    assert any("chmod 600" in w for w in out["warnings"])
    assert all(c["writable"] for c in out["cache_dirs"]) and (tmp_path / "hf" / "hub").is_dir()
    assert out["disk"]["shortfall_gb"] == 0 and "sk-test" not in json.dumps(out)
    env.chmod(0o600)
    assert not any("chmod" in w for w in gpu_bootstrap.run(fake_ctx(tmp_path))["warnings"])


def test_gpu_bootstrap_reports_the_env_file_the_settings_read_and_warns_about_a_stray_one(tmp_path, monkeypatch):
    """Issue 14 §4: a .env in the output root was reported present, but the settings never read it."""
    from pipeline import settings
    from pipeline.stages import gpu_bootstrap
    monkeypatch.setattr(gpu_bootstrap, "REQUIRED_IMPORTS", ("torch",))
    monkeypatch.setattr(settings, "DOTENV", tmp_path / "repo" / ".env")
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-stray\n")
    out = gpu_bootstrap.run(fake_ctx(tmp_path))
    assert out["env_file"]["present"] is False
    assert any(f"{tmp_path / '.env'} is ignored" in w and str(tmp_path / "repo" / ".env") in w for w in out["warnings"])
    assert "sk-stray" not in json.dumps(out)


# ---------------------------------------------------------------- recorded probes (GPU_PROBE_FILE)
REPO = Path(hw.__file__).resolve().parents[1]
PROBES = REPO / "configs" / "probes"
SHIPPED = ["rtx4090_24g.json", "a100_40g.json", "a100_80g.json", "v100x2_32g.json", "t4_16g.json",
           "h100_80g.json"]
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
GPU_CHECK_SCHEMA = ev.schema_file("gpu_check")


def probe_doc(**over):
    doc = {"note": "test machine", "devices": [{"name": "NVIDIA A100-SXM4-80GB", "capability": [8, 0],
                                                "total_gb": 79.15, "free_gb": 78.7}],
           "driver": "570.124.06", "cuda_runtime": "12.8", "torch_version": "2.13.0+cu128",
           "torch_arch_list": CU128}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not ...}


def write_probe(tmp_path, doc, name="probe.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_the_shipped_probe_files_are_exactly_the_contracts_list():
    found = sorted(p.name for p in PROBES.glob("*.json"))
    assert found == sorted(SHIPPED), "configs/probes/ must hold exactly the files CONTRACT.md names"


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_probe_loads_validates_and_has_a_torch_for_its_gpu(name):
    found = hw.load_probe_file(PROBES / name)
    assert found["source"] == "file" and found["file"] == str(PROBES / name) and found["cuda_available"]
    assert "free_gb is a typical idle value" in json.loads((PROBES / name).read_text())["note"]
    evidence = {"status": "ok", "probe": found, "plan": plan(found), "messages": []}
    jsonschema.validate(evidence, GPU_CHECK_SCHEMA)
    for d in found["devices"]:      # a rehearsal on any shipped GPU must not stop on the torch build
        assert hw.arch_supported(d["capability"], found["torch_arch_list"]), (name, d)
    old_gpu = any(tuple(d["capability"]) < (8, 0) for d in found["devices"])
    assert found["torch_version"].endswith("+cu126" if old_gpu else "+cu128")


def test_probe_file_has_the_live_probes_shape_and_plans_exactly_like_it(tmp_path):
    found = hw.load_probe_file(write_probe(tmp_path, probe_doc()))
    live = hw.probe()
    assert set(live) <= set(found)
    assert {"source", "file", "cuda_runtime", "torch_arch_list"} <= set(found)
    assert live["source"] == "live" and found["source"] == "file"
    dev = found["devices"][0]
    assert dev == {"index": 0, "name": "NVIDIA A100-SXM4-80GB", "capability": [8, 0], "total_gb": 79.15,
                   "free_gb": 78.7, "bf16": True}
    assert (found["flash_attn"], found["bitsandbytes"]) == (False, True)   # the defaults: not pinned / pinned
    same = machine(gpu(dev["name"], (8, 0), 79.15, free=78.7))
    same.update(torch_version="2.13.0+cu128", torch_arch_list=CU128)
    assert plan(found, tier="14b", qlora=True) == plan(same, tier="14b", qlora=True)


def test_live_probe_records_the_arch_list_only_with_cuda():
    found = hw.probe()
    assert found["source"] == "live"
    if not found["cuda_available"]:
        assert found["torch_arch_list"] is None


BAD_PROBES = [
    ("not json", "{devices: [", "not valid JSON"),
    ("top level", "[1, 2]", "a JSON object"),
    ("unknown key", probe_doc(device=[]), "'device'"),
    ("no devices", probe_doc(devices=...), "'devices'"),
    ("empty devices", probe_doc(devices=[]), "'devices'"),
    ("device not object", probe_doc(devices=["A100"]), "'devices[0]'"),
    ("capability", probe_doc(devices=[{"name": "X", "capability": [8], "total_gb": 8.0, "free_gb": 7.0}]),
     "'devices[0].capability'"),
    ("capability strings", probe_doc(devices=[{"name": "X", "capability": ["8", "0"], "total_gb": 8.0,
                                               "free_gb": 7.0}]), "'devices[0].capability'"),
    ("total", probe_doc(devices=[{"name": "X", "capability": [8, 0], "total_gb": "80", "free_gb": 7.0}]),
     "'devices[0].total_gb'"),
    ("free above total",
     probe_doc(devices=[{"name": "X", "capability": [8, 0], "total_gb": 8.0, "free_gb": 9.0}]),
     "'devices[0].free_gb'"),
    ("device key", probe_doc(devices=[{"name": "X", "capability": [8, 0], "total_gb": 8.0, "free": 7.0}]),
     "'devices[0].free'"),
    ("no name", probe_doc(devices=[{"name": "", "capability": [8, 0], "total_gb": 8.0, "free_gb": 7.0}]),
     "'devices[0].name'"),
    ("driver", probe_doc(driver=570), "'driver'"),
    ("cuda runtime", probe_doc(cuda_runtime=None), "'cuda_runtime'"),
    ("torch version", probe_doc(torch_version=...), "'torch_version'"),
    ("arch list", probe_doc(torch_arch_list="sm_80"), "'torch_arch_list'"),
    ("arch entry", probe_doc(torch_arch_list=["sm80"]), "'torch_arch_list[0]'"),
    ("flash_attn", probe_doc(flash_attn="yes"), "'flash_attn'"),
    ("bitsandbytes", probe_doc(bitsandbytes=1), "'bitsandbytes'"),
]


@pytest.mark.parametrize("label,doc,field", BAD_PROBES, ids=[b[0] for b in BAD_PROBES])
def test_a_bad_probe_file_is_one_line_naming_the_file_the_field_and_the_fix(tmp_path, label, doc, field):
    path = write_probe(tmp_path, doc)
    with pytest.raises(ValueError) as err:
        hw.load_probe_file(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and field in msg, msg
    assert "fix" in msg or "use" in msg or "add" in msg or "remove" in msg, msg


def test_a_missing_probe_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(ValueError, match="no such file.*configs/probes"):
        hw.load_probe_file(tmp_path / "nope.json")


# ---------------------------------------------------------------- torch build vs the GPU's arch
def test_a_torch_wheel_without_the_gpus_arch_makes_the_plan_infeasible_with_the_fix():
    cu128 = machine(V100, gpu("Tesla V100-SXM2-32GB", (7, 0), 32.0))
    cu128.update(torch_version="2.13.0+cu128", torch_arch_list=CU128)
    p = plan(cu128, nproc=2)
    assert not p["feasible"]
    reason = p["feasible_reason"]
    for part in ("2.13.0+cu128", "sm_75, sm_80, sm_86, sm_90, sm_100, sm_120", "sm_70",
                 "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 TORCH_REINSTALL=true make venv"):
        assert part in reason, reason
    cu126 = dict(cu128, torch_version="2.13.0+cu126", torch_arch_list=CU126)
    assert plan(cu126, nproc=2)["feasible"]


@pytest.mark.parametrize("cap,arch_list,ok", [
    ((7, 0), CU126, True), ((7, 0), CU128, False), ((8, 6), ["sm_80"], True),   # same major, lower minor
    ((7, 5), ["sm_70"], True), ((9, 0), ["sm_80"], False), ((9, 0), ["sm_80", "compute_80"], True),  # PTX
    ((8, 0), ["compute_86"], False), ((12, 0), CU126, False), ((12, 0), CU128, True),
    ((9, 0), ["sm_90a"], True), ((9, 1), ["sm_90a"], False),
    ((7, 0), None, True), ((7, 0), [], True)])        # unknown (CPU probe) is not a failure
def test_arch_compatibility(cap, arch_list, ok):
    assert hw.arch_supported(list(cap), arch_list) is ok


def test_a_new_gpu_on_an_old_torch_is_told_to_use_a_newer_index():
    blackwell = machine(gpu("NVIDIA RTX PRO 6000", (12, 0), 95.0))
    blackwell.update(torch_version="2.13.0+cu126", torch_arch_list=CU126)
    p = plan(blackwell)
    assert not p["feasible"] and "whl/cu128" in p["feasible_reason"]


def run_bootstrap(tmp_path, env, stamp_ok=True):
    """scripts/bootstrap_venv.sh in a copy of the repo, with a fake .venv/bin/python that logs its calls."""
    import shutil
    import subprocess
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "bootstrap_venv.sh", tmp_path / "scripts")
    shutil.copy(REPO / "requirements.txt", tmp_path)
    (tmp_path / "pipeline").mkdir()
    shutil.copy(REPO / "pipeline" / "torch_fit.py", tmp_path / "pipeline")   # hashed into the up-to-date stamp
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n')
    (bin_dir / "python").chmod(0o755)
    if stamp_ok:
        want = subprocess.run("cat requirements.txt scripts/bootstrap_venv.sh pipeline/torch_fit.py | sha256sum | cut -d' ' -f1",
                              shell=True, cwd=tmp_path, capture_output=True, text=True, check=True)
        want = want.stdout.strip()
        (tmp_path / ".venv" / ".requirements.sha256").write_text(want + "\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_")}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "bootstrap_venv.sh")], env={**clean, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return [line for line in calls if "pip" in line], out.stdout


def test_bootstrap_reinstalls_torch_from_the_index_only_when_asked(tmp_path):
    pips, _ = run_bootstrap(tmp_path / "a", {})
    assert pips == []                                   # up to date: nothing installed, as before
    index = "https://download.pytorch.org/whl/cu126"
    pips, out = run_bootstrap(tmp_path / "b", {"TORCH_INDEX_URL": index, "TORCH_REINSTALL": "true"})
    torch_calls = [c for c in pips if "torch==2.13.0" in c]
    assert len(torch_calls) == 1
    assert "--force-reinstall" in torch_calls[0] and f"--index-url {index}" in torch_calls[0]
    assert any("-r requirements.txt" in c for c in pips) and index in out
    pips, _ = run_bootstrap(tmp_path / "c", {"TORCH_SPEC": "torch==2.9.1", "TORCH_REINSTALL": "true"})
    assert any("--force-reinstall" in c and "torch==2.9.1" in c and "--index-url" not in c for c in pips)


# ---------------------------------------------------------------- memory: QLoRA upcast, loss head, stages
def test_qlora_estimate_counts_the_fp32_upcast_of_embeddings_and_lm_head():
    # prepare_model_for_kbit_training casts every 16-bit non-4-bit param to fp32 (peft/utils/other.py:204)
    for tier, extra in (("7b", 2.0), ("14b", 2.9)):
        nf4 = hw.estimate_memory(hw.MODEL_SHAPES[tier], precision="bf16", quantization="nf4", **LORA)
        assert nf4["kbit_upcast_gb"] == pytest.approx(extra, abs=0.05), tier
        assert any("prepare_model_for_kbit_training" in a for a in nf4["assumptions"])
        lora = hw.estimate_memory(hw.MODEL_SHAPES[tier], precision="bf16", quantization=None, **LORA)
        assert lora["kbit_upcast_gb"] == 0


def test_qlora_adapters_count_as_bf16_where_trl_casts_them():
    # SFT/DPO/KTO cast QLoRA's trainable params to bf16 (trl/trainer/sft_trainer.py:908-911, dpo_trainer.py:726-729,
    # kto_trainer.py:777-780); CPOTrainer (SimPO) leaves an already-wrapped PeftModel's fp32 adapters alone;
    # under fp16 the pipeline casts them back to fp32 (models.fix_trainable_dtype), so fp16 counts fp32
    shape = hw.MODEL_SHAPES["7b"]
    est = {s: hw.estimate_memory(shape, precision="bf16", quantization="nf4", stage=s, **LORA)
           for s in ("sft", "dpo", "simpo", "kto")}
    lora = hw.estimate_memory(shape, precision="bf16", quantization=None, **LORA)
    for s in ("sft", "dpo", "kto"):
        assert est[s]["adapters_gb"] == pytest.approx(lora["adapters_gb"] / 2, rel=0.01), s
        assert est[s]["optimizer_gb"] == pytest.approx(lora["optimizer_gb"] / 2, rel=0.01), s
        assert any("bf16" in a and "trainer" in a for a in est[s]["assumptions"]), s
    assert est["simpo"]["adapters_gb"] == lora["adapters_gb"]
    fp16 = hw.estimate_memory(shape, precision="fp16", quantization="nf4", stage="sft", **LORA)
    assert fp16["adapters_gb"] == lora["adapters_gb"]


def test_loss_head_is_tiled_for_sft_dpo_kto_and_full_fp32_logits_for_simpo():
    shape, tokens = hw.MODEL_SHAPES["7b"], 2 * 2048          # simpo: chosen + rejected at batch 1
    est = {s: hw.estimate_memory(shape, precision="bf16", quantization=None, stage=s, **LORA)
           for s in ("sft", "dpo", "simpo", "kto")}
    assert est["simpo"]["loss_head_gb"] == pytest.approx(tokens * shape["vocab"] * 8 / hw.GIB, rel=0.01)
    for s in ("sft", "dpo", "kto"):   # one [4096 x 32768] 16-bit tile + fp32 hidden-state gradient
        assert est[s]["loss_head_gb"] < 0.5, s
    assert est["sft"]["loss_head_gb"] < est["dpo"]["loss_head_gb"] < est["simpo"]["loss_head_gb"] / 10


def test_paired_stages_count_two_sequences_per_example_and_kto_one():
    shape = hw.MODEL_SHAPES["7b"]
    act = {s: hw.estimate_memory(shape, precision="bf16", quantization=None, stage=s, **LORA)
           ["activations_gb"] for s in ("sft", "dpo", "simpo", "kto")}
    assert act["dpo"] == pytest.approx(2 * act["sft"], rel=1e-3) and act["simpo"] == act["dpo"]
    assert act["kto"] == act["sft"]
    kto = hw.estimate_memory(shape, precision="bf16", quantization=None, stage="kto", **LORA)
    assert any("KL" in a and "no_grad" in a for a in kto["assumptions"])
    with pytest.raises(ValueError, match="stage"):
        hw.estimate_memory(shape, precision="bf16", quantization=None, stage="no_such_method", **LORA)


STAGES = {"sft": {"seq_len": 2048, "batch": 1}, "dpo": {"seq_len": 1024, "batch": 1},
          "simpo": {"seq_len": 2048, "batch": 2}, "kto": {"seq_len": 1024, "batch": 2}}


def test_plan_records_an_estimate_per_stage_and_judges_by_the_largest():
    p = hw.make_plan(machine(gpu("NVIDIA A10", (8, 6), 24.0, free=23.0)), tier="7b", want_qlora=False,
                     want_flash_attn=True, min_mem_gb=MIN_MEM, estimate_inputs=LORA, stage_inputs=STAGES)
    est = p["memory_estimates"]
    assert set(est) == set(STAGES) and p["memory_estimate"] == est["sft"]
    assert (est["simpo"]["seq_len"], est["simpo"]["batch"], est["simpo"]["sequences"]) == (2048, 2, 4)
    assert max(e["total_gb"] for e in est.values()) == est["simpo"]["total_gb"]
    assert est["simpo"]["total_gb"] > 23.0 > est["sft"]["total_gb"]
    assert not p["feasible"] and "simpo" in p["feasible_reason"] and "23.0 GB free" in p["feasible_reason"]


def test_fragmentation_has_one_figure_and_the_docs_cite_it():
    import re
    docs = [*sorted((REPO / "configs" / "runtime").glob("*.env")),
            REPO / "docs" / "V100_DUAL_CARD_TEMPLATE.md"]
    assert len(docs) >= 3
    for doc in docs:
        text = doc.read_text()
        figures = re.findall(r"(\d+(?:\.\d+)?) ?% (?:allocator )?fragmentation", text)
        assert figures and {float(f) for f in figures} == {hw.FRAGMENTATION * 100}, (doc, figures)
        assert "FRAGMENTATION" in text, doc


def env_file(name):
    pairs = [line.split("=", 1) for line in (REPO / "configs" / "runtime" / name).read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


def env_plan(name, tmp_path):
    """The plan gpu_check makes for a runtime env file on the GPU named in its GPU_PROBE_FILE comment."""
    import re

    from pipeline.settings import load_config
    from pipeline.stages import gpu_check
    text = (REPO / "configs" / "runtime" / name).read_text()
    probe_file = re.search(r"GPU_PROBE_FILE=(\S+)", text).group(1)
    cfg = load_config(env={**env_file(name), "PIPELINE_ROOT": str(tmp_path)})
    return cfg, hw.make_plan(hw.load_probe_file(REPO / probe_file), **gpu_check.plan_inputs(cfg)), text


@pytest.mark.parametrize("name", ["v100_dual_32g.env", "a100_single_80g.env"])
def test_runtime_env_comments_quote_the_current_estimate(name, tmp_path):
    import re
    _, p, text = env_plan(name, tmp_path)
    quoted = dict(re.findall(r"estimate (\w+) (\d+\.\d) GB", text))
    assert set(quoted) == set(REGISTRY.methods), f"{name}: quote 'estimate <stage> <N> GB' per stage"
    for stage, gb in quoted.items():
        assert float(gb) == pytest.approx(p["memory_estimates"][stage]["total_gb"], abs=0.051), (name, stage)
    assert p["feasible"], p["feasible_reason"]


def test_v100_doc_table_quotes_the_current_estimate(tmp_path):
    import re
    _, p, _ = env_plan("v100_dual_32g.env", tmp_path)
    doc = (REPO / "docs" / "V100_DUAL_CARD_TEMPLATE.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+) \| (\d+\.\d) \|", doc, flags=re.M)
    assert {r[0] for r in rows} == set(REGISTRY.methods)
    for stage, seq, seqs, gb in rows:
        e = p["memory_estimates"][stage]
        assert (int(seq), int(seqs)) == (e["seq_len"], e["sequences"]), stage
        assert float(gb) == pytest.approx(e["total_gb"], abs=0.051), stage


def test_a100_env_trains_14b_in_bf16_without_qlora(tmp_path):
    assert env_file("a100_single_80g.env")["QLORA"] == "false"
    cfg, p, _ = env_plan("a100_single_80g.env", tmp_path)
    assert cfg.tier == "14b" and cfg.model.qlora is False
    assert (p["precision"], p["quantization"], p["feasible"]) == ("bf16", None, True)


# ---------------------------------------------------------------- flash-attn that is installed but broken
def broken_flash_attn(monkeypatch, tmp_path):
    pkg = tmp_path / "site" / "flash_attn"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_probe_really_imports_flash_attn_and_records_why_it_failed(monkeypatch, tmp_path):
    broken_flash_attn(monkeypatch, tmp_path)
    found = hw.probe()
    assert found["flash_attn"] is False and "undefined symbol" in found["flash_attn_error"]
    p = plan(dict(machine(A100), flash_attn=found["flash_attn"], flash_attn_error=found["flash_attn_error"]))
    assert p["attn_implementation"] == "sdpa" and "undefined symbol" in p["attn_reason"]
    assert any("undefined symbol" in d for d in p["downgrades"])


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 vs device_map
def test_zero3_is_refused_with_the_alternative_and_zero2_is_allowed():
    zero3 = hw.read_deepspeed_config("configs/deepspeed/zero3.json", REPO / "configs/deepspeed/zero3.json")
    zero2 = hw.read_deepspeed_config("configs/deepspeed/zero2.json", REPO / "configs/deepspeed/zero2.json")
    assert (zero3["zero_stage"], zero2["zero_stage"]) == (3, 2)
    two = machine(V100, V100)
    p = hw.make_plan(two, tier="14b", want_qlora=False, want_flash_attn=True, min_mem_gb={},
                     estimate_inputs=LORA, nproc=2, deepspeed=zero3)
    assert not p["feasible"] and p["deepspeed"] == zero3
    for part in ("zero3.json", "device_map", "QLORA=true NPROC=2"):
        assert part in p["feasible_reason"], p["feasible_reason"]
    ok = hw.make_plan(two, tier="7b", want_qlora=False, want_flash_attn=True, min_mem_gb={},
                      estimate_inputs=LORA, nproc=2, deepspeed=zero2)
    assert ok["feasible"], ok["feasible_reason"]


def test_a_bad_deepspeed_config_is_one_line(tmp_path):
    bad = tmp_path / "ds.json"
    for text, part in (("{", "not valid JSON"),
                       ('{"zero_optimization": {"stage": "3"}}', "zero_optimization.stage")):
        bad.write_text(text)
        with pytest.raises(ValueError) as err:
            hw.read_deepspeed_config("ds.json", bad)
        assert "\n" not in str(err.value) and "ds.json" in str(err.value) and part in str(err.value)
    with pytest.raises(ValueError, match="no such file"):
        hw.read_deepspeed_config("nope.json", tmp_path / "nope.json")


# ---------------------------------------------------------------- fp16 risk
def test_fp16_plans_record_the_overflow_risk_and_bf16_plans_none():
    risks = plan(machine(V100))["risks"]
    assert risks and any("inf/NaN" in r and "non-finite loss" in r for r in risks)
    assert plan(machine(A100))["risks"] == [] and plan(machine(), tier="tiny")["risks"] == []


# ---------------------------------------------------------------- the rehearsal plan
def test_rehearsal_plan_keeps_the_gpu_configuration_on_the_cpu():
    v100 = hw.load_probe_file(PROBES / "v100x2_32g.json")
    gpu_plan = plan(v100, nproc=2)
    optimizers = {"sft": "paged_adamw_8bit", "dpo": "adamw_torch"}
    run, diffs = hw.rehearsal_plan(gpu_plan, v100, optimizers=optimizers)
    assert set(run) == set(gpu_plan) | {"rehearsal"} and run["rehearsal"] is True
    assert (run["device"], run["precision"], run["fp16"], run["n_gpus"]) == ("cpu", "fp16", True, 2)
    assert run["feasible"] == gpu_plan["feasible"] and run["memory_estimates"] == gpu_plan["memory_estimates"]
    text = " | ".join(diffs)
    for part in ("GradScaler", "NCCL -> gloo", "peak memory is the CPU RSS",
                 "paged_adamw_8bit -> adamw_torch (sft)"):
        assert part in text, part
    assert "flash_attention_2" not in text              # the V100 plan had sdpa already

    a100 = hw.load_probe_file(PROBES / "a100_80g.json")
    a100["flash_attn"] = True
    gpu_plan = plan(a100, qlora=True)
    run, diffs = hw.rehearsal_plan(gpu_plan, a100)
    assert (run["attn_implementation"], run["quantization"], run["precision"]) == ("sdpa", "nf4", "bf16")
    assert gpu_plan["attn_implementation"] == "flash_attention_2"      # the GPU plan itself is untouched
    text = " | ".join(diffs)
    assert "flash_attention_2 -> sdpa" in text and "nf4" in text and "gloo" not in text and "8bit" not in text


def test_nf4_runs_on_this_cpu():
    import bitsandbytes  # noqa: F401  - the rehearsal keeps nf4: bitsandbytes 0.50 has CPU kernels


# ---------------------------------------------------------------- gpu_check with a probe file / a rehearsal
def test_gpu_check_plans_from_the_probe_file(tmp_path):
    from pipeline.stages import gpu_check
    ctx = fake_ctx(tmp_path, tier="7b")
    ctx.cfg.runtime.gpu_probe_file = "configs/probes/a100_80g.json"
    out = gpu_check.run(ctx)
    jsonschema.validate({"status": "ok", **out}, GPU_CHECK_SCHEMA)
    assert out["probe"]["source"] == "file" and out["probe"]["file"] == "configs/probes/a100_80g.json"
    p = out["plan"]
    assert (p["device"], p["precision"], p["feasible"]) == ("cuda", "bf16", True)
    assert set(out["plan"]["memory_estimates"]) == set(REGISTRY.methods)
    assert "run_plan" not in out and "rehearsal" not in out
    assert any("configs/probes/a100_80g.json" in m for m in out["messages"])


def test_gpu_check_with_a_bad_probe_file_fails_in_one_line(tmp_path):
    from pipeline.engine import StageFailed
    from pipeline.stages import gpu_check
    ctx = fake_ctx(tmp_path, tier="7b")
    ctx.cfg.runtime.gpu_probe_file = str(write_probe(tmp_path, probe_doc(torch_arch_list=["sm80"])))
    with pytest.raises(StageFailed) as err:
        gpu_check.run(ctx)
    assert "\n" not in str(err.value) and "torch_arch_list[0]" in str(err.value)
    ctx.cfg.runtime.gpu_probe_file = None
    ctx.cfg.runtime.deepspeed_config = str(write_probe(tmp_path, "{", "ds.json"))
    with pytest.raises(StageFailed, match="not valid JSON"):
        gpu_check.run(ctx)


def test_gpu_check_refuses_zero3_from_the_config(tmp_path):
    from pipeline.stages import gpu_check
    ctx = fake_ctx(tmp_path, tier="14b")
    ctx.cfg.runtime.gpu_probe_file, ctx.cfg.runtime.nproc = "configs/probes/v100x2_32g.json", 2
    ctx.cfg.runtime.deepspeed_config = "configs/deepspeed/zero3.json"
    out = gpu_check.run(ctx)
    assert out["plan"]["deepspeed"]["zero_stage"] == 3 and not out["plan"]["feasible"]
    assert "QLORA=true NPROC=2" in out["plan"]["feasible_reason"]


def test_gpu_check_rehearsal_records_plan_run_plan_and_the_differences(tmp_path):
    from pipeline.stages import gpu_check
    ctx = fake_ctx(tmp_path, tier="7b")
    ctx.cfg.runtime.gpu_probe_file, ctx.cfg.runtime.nproc = "configs/probes/v100x2_32g.json", 2
    plain = gpu_check.run(ctx)
    ctx.cfg.runtime.rehearsal = True
    out = gpu_check.run(ctx)
    jsonschema.validate({"status": "ok", **out}, GPU_CHECK_SCHEMA)
    assert out["plan"] == plain["plan"]
    assert out["run_plan"]["device"] == "cpu" and out["run_plan"]["rehearsal"] is True
    reh = out["rehearsal"]
    assert reh["probe"] == "configs/probes/v100x2_32g.json"
    assert reh["stand_in"] == "tiny Qwen2 (random init, seed 0) in place of Qwen/Qwen2.5-7B-Instruct"
    assert reh["differences"] == hw.rehearsal_plan(out["plan"], out["probe"],
                                                   optimizers={s: getattr(ctx.cfg, s).optimizer
                                                               for s in REGISTRY.methods})[1]
    assert any("NCCL -> gloo" in m for m in out["messages"])


def test_a_rehearsal_checks_the_disk_for_its_stand_in_and_warns_about_the_tier_need(tmp_path, monkeypatch):
    """CI failed on a host with 68.3 GB free: a 14b rehearsal trains a stand-in model, so the host disk
    must hold the stand-in, while the tier's own need is recorded and warned about, not enforced."""
    from collections import namedtuple

    from pipeline.engine import StageFailed
    from pipeline.stages import gpu_bootstrap
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(gpu_bootstrap.shutil, "disk_usage",
                        lambda p: usage(100 * 2**30, 32 * 2**30, int(68.3 * 2**30)))
    monkeypatch.setattr(gpu_bootstrap, "REQUIRED_IMPORTS", ("torch",))
    ctx = fake_ctx(tmp_path, tier="14b")
    with pytest.raises(StageFailed, match="disk_space.*68.3 GB free.*needs >= 70 GB"):
        gpu_bootstrap.run(ctx)
    ctx.cfg.runtime.rehearsal = True
    out = gpu_bootstrap.run(ctx)
    jsonschema.validate({"status": "ok", **out}, ev.schema_file("gpu_bootstrap"))
    assert out["disk"]["need_gb"] == gpu_bootstrap.DISK_NEED_GB["tiny"] and out["disk"]["tier_need_gb"] == 70
    assert any("the 14b tier needs >= 70 GB" in w and "GPU host" in w for w in out["warnings"])

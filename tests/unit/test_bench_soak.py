"""`make bench` and `make soak` at their smallest settings: the files are written and every must-be-zero counter
is 0; the CUDA benchmark's pure parts (peak table, memory comparison) and its model build (in memory).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m slow tests/unit/test_bench_soak.py   (minutes on 2 CPUs)
     HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_bench_soak.py           (the fast ones)
No timing is asserted: the benchmarks report speed, these tests check what the reports say about waste and loss.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import REGISTRY
from scripts import bench

REPO = Path(__file__).resolve().parents[2]


def run_script(module: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PIPELINE_ROOT", None)
    return subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_bench_quick_writes_its_reports_and_the_no_op_loads_nothing(tmp_path):
    done = run_script("scripts.bench", tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert "| benchmark | metric | value |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "day1_stages.png").is_file() and (tmp_path / "sft_throughput.png").is_file()
    day1 = res["day1"]
    assert day1["full"]["exit_codes"] == [0] and set(day1["noop"]["exit_codes"]) == {0}
    assert day1["full"]["from_pretrained_calls"] > 0, "the probe must see the full run's model loads"
    assert day1["noop"]["from_pretrained_calls"] == 0 and day1["noop"]["modeling_modules_imported"] == []
    assert day1["noop"]["judge_requests"] == 0 and res["judge"]["rerun"]["requests_made"] == 0
    assert all(v["exit_codes"] and set(v["exit_codes"]) == {0} for v in res["sft"]["variants"].values())
    ours, plain = res["sft"]["variants"]["ours (same work as plain: no eval, one checkpoint)"], res["sft"]["variants"]["plain TRL"]
    assert ours["final_loss"]["median"] == pytest.approx(plain["final_loss"]["median"], rel=1e-3)   # the same training
    assert res["eval"]["extracted_answers_identical"].split("/")[1] == "8"
    assert res["cuda"].get("skipped") or res["cuda"]["runs"]
    pre = res["preflight"]   # predicted vs actual per training stage and in total (ratios; no timed assertion)
    assert [r["rc"] for r in pre["runs"]] == [0]
    assert set(REGISTRY.methods) | {"total"} <= set(pre["ratio_actual_to_predicted"])


@pytest.mark.slow
def test_soak_quick_writes_its_reports_and_every_must_be_zero_counter_is_zero(tmp_path):
    done = run_script("scripts.soak", tmp_path)
    res = json.loads((tmp_path / "soak.json").read_text())
    assert res["must_be_zero"] == dict.fromkeys(res["must_be_zero"], 0), res["must_be_zero"]
    assert done.returncode == 0, done.stdout[-3000:]
    assert "| area | count | value |" in (tmp_path / "soak.md").read_text()
    assert res["base_run"]["rc"] == 0
    assert res["secrets"]["judge_requests_with_the_key"] > 0, "the key was never used: the scan proves nothing"
    assert res["kill9"]["kto"]["trials"] == 1 and res["kill9"]["kto"]["reruns_ok"] == 1
    assert res["tamper"]["total"] > 0 and res["tamper"]["detected"] == res["tamper"]["total"]
    assert res["malformed"]["total"] > 0 and res["malformed"]["clear_errors"] == res["malformed"]["total"]
    assert res["judge_faults"]["completed_after_clean_rerun"] == res["judge_faults"]["items"]
    assert res["two_pipelines"]["refusals"] == res["two_pipelines"]["trials"]
    assert res["moved_root"]["tried"] == 3 and res["moved_root"]["same_verdict"] == 3, res["moved_root"]["rows"]
    fa = res["failed_attempt"]
    assert fa["tried"] == 1 and fa["kept"] == 1 and fa["rows"][0]["restored"], fa["rows"]


# --- the CUDA benchmark's parts that run without a GPU ---------------------------------------------------
@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA GeForce RTX 4090", 165),      # fp32 accumulate (training); its fp16-accumulate figure is 330
    ("NVIDIA GeForce RTX 3090", 71),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
    ("Tesla V100-SXM2-32GB", 125), ("Tesla V100-PCIE-16GB", 112),
    ("Tesla T4", 65), ("NVIDIA L4", 121), ("NVIDIA L40S", 362),
    ("NVIDIA RTX A1000", None),            # not an A100: a name is matched whole, never inside another
    ("NVIDIA GeForce RTX 4080", None),     # unknown: no MFU rather than a wrong one
])
def test_peak_tflops_is_the_dense_fp32_accumulate_figure_of_the_whole_name(name, tflops):
    assert bench.peak_tflops(name) == tflops


def test_memory_comparison_sets_like_against_like():
    from pipeline.stages.gpu_selftest import compare_memory
    estimate = {"total_gb": 21.0, "overhead_gb": 1.8}   # parts 19.2 + context and fragmentation 1.8
    c = compare_memory(estimate, reserved_gb=20.0, allocated_gb=16.0, context_gb=0.8)
    assert c["measured_reserved_plus_context_gb"] == 20.8
    assert c["total_ratio"] == pytest.approx(21.0 / 20.8, abs=1e-3)
    assert c["estimate_parts_gb"] == 19.2 and c["parts_ratio"] == pytest.approx(19.2 / 16.0, abs=1e-3)
    assert "reserved" in c["compared"] and "allocated" in c["compared"]
    none = compare_memory(estimate, reserved_gb=None, allocated_gb=None, context_gb=None)   # a CPU run
    assert none["total_ratio"] is None and none["parts_ratio"] is None


def test_cuda_benchmark_builds_its_model_in_memory_and_writes_nothing_to_tmpdir(tmp_path, monkeypatch):
    """The same code as on a GPU (the tiny shape, on the CPU): the random-init model is built in memory and
    trained by the pipeline's SFT trial; the old code wrote a 15 GB model folder into TMPDIR first."""
    import tempfile
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_gpu = {"cuda_available": False, "devices": [], "bitsandbytes": False}
    res = bench.lora_benchmark(tmp_path / "work", "tiny", no_gpu, reps=1, seq=64, device_name="cpu")
    files = [p for p in [*tmpdir.rglob("*"), *(tmp_path / "work").rglob("*")] if p.is_file()]
    in_tmp = [p for p in files if tmpdir in p.parents]
    big = [p for p in files if p.stat().st_size > 8 * 2**20]
    big += [p for p in in_tmp if p.suffix in (".safetensors", ".bin")]
    assert big == [], f"model files written: {big}"
    # the only thing TMPDIR may get is torch's own kernel cache (torchinductor_<user>), as in every training run
    assert [p for p in in_tmp if not p.relative_to(tmpdir).parts[0].startswith("torchinductor_")] == []
    lora = res["runs"]["lora"]
    assert lora.get("errors") == [] and lora["tokens_per_s"]["median"] > 0
    assert lora["source"] == "random-init" and lora["seq_len"] == 64
    assert lora["mfu"] is None   # no peak figure for a CPU
    assert "reserved" in lora["memory_vs_estimate"]["compared"]
    assert "skipped" in res["runs"]["qlora_nf4"]   # 4-bit needs CUDA and bitsandbytes

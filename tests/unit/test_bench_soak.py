"""`make bench` and `make soak` at their smallest settings: the files are written and every must-be-zero counter is 0.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m slow tests/unit/test_bench_soak.py   (a few minutes on 2 CPUs)
No timing is asserted: the benchmarks report speed, these tests check what the reports say about waste and loss.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_script(module: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PIPELINE_ROOT", None)
    return subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


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

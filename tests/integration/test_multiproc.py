"""NPROC=2: SFT runs as two DDP processes under `accelerate launch` (gloo on the CPU); rank 0 alone
writes the final checkpoint and the evidence.

Run: .venv/bin/python -m pytest -x -q tests/integration/test_multiproc.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import pytest

from pipeline import evidence as ev
from pipeline.settings import REPO

STEPS, BATCH, NPROC, ROWS = 6, 4, 2, 96     # ROWS: the tiny tier's data.max_sft_rows
PLAN = [f"sft.max_steps={STEPS}", f"sft.batch_size={BATCH}", "sft.grad_acc=1", "sft.save_steps=3", "sft.eval_steps=3",
        "sft.curriculum=[{max_length: 64, until_step: 3}, {max_length: 128, until_step: 6}]"]


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_two_process_sft_reaches_the_plan_and_rank_0_writes_the_final_once(tiny_env):
    env = {**os.environ, "NPROC": str(NPROC)}
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "sft", *PLAN], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    log = (tiny_env / "reports/logs/sft_full.log").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    doc = json.loads((tiny_env / "reports/training/layer_b_tiny_sft_metrics.json").read_text())
    assert doc["status"] == "ok" and ev.validate("sft", doc) == []
    assert doc["distributed"]["world_size"] == NPROC and doc["distributed"]["backend"] == "gloo"
    assert doc["global_step"] == doc["planned_max_steps"] == STEPS
    assert [c["reached_step"] for c in doc["curriculum"]] == [3, 6]
    assert [s for s, _ in doc["loss_curve"]] == list(range(1, STEPS + 1))

    final = tiny_env / doc["checkpoint_dir"]
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["epoch"] == STEPS * BATCH * NPROC / ROWS      # the two ranks trained on different halves
    assert ev.sha256_tree(final) == doc["checkpoint_files"]
    assert log.count("train_worker rank 0 of 2: wrote") == 1
    assert log.count("train_worker rank 1 of 2: training done") == 1
    assert not list(final.parent.parent.glob(final.parent.name + ".stale*"))   # nothing was set aside

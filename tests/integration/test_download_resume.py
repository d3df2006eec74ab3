"""Issue 13 §1 on the tiny model: the fake hub (tests/fakes/hf_hub.py) serves its files through the endpoints
huggingface_hub uses; the download lands where transformers loads it by the hub id, and a download killed mid-file
(SIGKILL of `python -m pipeline run download`) resumes: finished files are not fetched again and the killed file
continues from its partial with a Range request.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_download_resume.py
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import models
from pipeline.__main__ import main
from pipeline.settings import REPO
from tests.fakes.hf_hub import FakeHub, stage_env

EVIDENCE = "reports/migration/download.json"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.build_tiny(tmp_path_factory.getbasetemp() / "medllm-cache" / "tiny-seed0")


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_the_tiny_model_downloads_and_loads_by_its_hub_id_without_the_hub(tiny_env, tiny, monkeypatch):
    with FakeHub(tiny) as hub:
        cache = stage_env(monkeypatch, tiny_env, hub)
        assert main(["run", "download"]) == 0
    doc = json.loads((tiny_env / EVIDENCE).read_text())
    assert doc["status"] == "ok" and set(doc["files"]) == set(hub.files)   # config, tokenizer, template, weights
    for name, rec in doc["files"].items():
        assert rec["sha256"] == hashlib.sha256((tiny / name).read_bytes()).hexdigest(), name
    assert doc["files"][WEIGHTS]["verified"] and doc["resumed"] == {}
    from transformers import AutoModelForCausalLM, AutoTokenizer   # the hub is gone: the cache alone
    model = AutoModelForCausalLM.from_pretrained(hub.repo_id, cache_dir=cache, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(hub.repo_id, cache_dir=cache, local_files_only=True)
    assert model.config.hidden_size == 64 and tok.chat_template


def test_a_download_killed_mid_file_resumes_without_refetching_finished_files(tiny_env, tiny, monkeypatch):
    sent = 4 * 64 * 1024   # the fake sends this much of the weights, then stalls until the client is killed
    with FakeHub(tiny, stall_after={WEIGHTS: sent}) as hub:
        cache = stage_env(monkeypatch, tiny_env, hub)
        folder = cache / f"models--{hub.repo_id.replace('/', '--')}"
        small = sorted(n for n in hub.files if n != WEIGHTS)
        # huggingface_hub writes a file in 10 MiB chunks (constants.DOWNLOAD_CHUNK_SIZE): a killed 4 GB shard leaves
        # a partial of whole chunks. The 1.3 MB tiny weights get 64 KiB chunks so that a partial exists at all, and
        # a read timeout longer than the test, so that the kill, not a retry, ends the stall.
        code = ("import runpy, sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 64 * 1024; "
                "sys.argv = ['pipeline', 'run', 'download']; runpy.run_module('pipeline', run_name='__main__')")
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True,
                                env={**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": "120"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                parts = list((folder / "blobs").glob(f"{hub.sha256(WEIGHTS)}*.incomplete"))
                done = all((folder / "snapshots" / hub.commit / n).exists() for n in small)
                if done and parts and parts[0].stat().st_size == sent:
                    break
                assert proc.poll() is None, "the download ended before it was killed"
                time.sleep(0.1)
            else:
                pytest.fail("the download never reached the stalled file")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert (tiny_env / "reports/.incomplete/download.marker").exists()   # the engine saw it die mid-stage
        assert main(["run", "download"]) == 0
    doc = json.loads((tiny_env / EVIDENCE).read_text())
    assert doc["status"] == "ok" and doc["resumed"] == {WEIGHTS: sent}
    assert hub.gets(WEIGHTS) == [None, f"bytes={sent}-"]              # the killed file: continued, not restarted
    assert {n: hub.gets(n) for n in small} == {n: [None] for n in small}   # the finished ones: fetched once
    assert sorted(doc["already_cached"]) == small
    assert doc["files"][WEIGHTS]["sha256"] == hashlib.sha256((tiny / WEIGHTS).read_bytes()).hexdigest()
    assert not list((folder / "blobs").glob("*.incomplete"))

"""Issue 13 §1: the download stage against a fake hub on 127.0.0.1 serving a small synthetic model folder (no model
is built or loaded here; tests/integration/test_download_resume.py serves the tiny model and kills a download).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_download.py
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest

from pipeline import hub as H
from pipeline.__main__ import main
from pipeline.settings import ConfigError, load_config
from tests.fakes.hf_hub import FakeHub, stage_env

EVIDENCE = "reports/migration/download.json"


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "README.md").write_text("not fetched: a training run does not need it")
    return folder


@pytest.fixture
def fake_hub(model_folder):
    with FakeHub(model_folder) as hub:
        yield hub


def doc(root: Path) -> dict:
    return json.loads((root / EVIDENCE).read_text())


def resolves(hub) -> list:
    return [r for r in hub.requests if "/resolve/" in r[1]]


def test_a_gpu_tier_downloads_through_hf_endpoint_and_records_every_sha256(tiny_env, fake_hub, monkeypatch):
    cache = stage_env(monkeypatch, tiny_env, fake_hub)
    assert main(["run", "download"]) == 0
    d = doc(tiny_env)
    assert d["status"] == "ok" and d["model"] == fake_hub.repo_id and d["revision"] == fake_hub.commit
    assert d["endpoint"] == fake_hub.endpoint and d["offline"] is False and d["source"] == "hub"
    assert sorted(d["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]   # README.md not wanted
    for name, rec in d["files"].items():
        assert rec["sha256"] == hashlib.sha256(fake_hub.files[name]).hexdigest() == H.sha256_file(
            Path(d["snapshot"]) / name)
    weights = d["files"]["model.safetensors"]
    assert weights["weight"] and weights["verified"] and weights["expected_sha256"] == fake_hub.sha256("model.safetensors")
    assert d["disk"]["need_bytes"] == sum(len(fake_hub.files[n]) for n in d["files"])
    # the layout transformers resolves a hub id in: refs/main -> snapshots/<commit>
    from huggingface_hub import try_to_load_from_cache
    assert try_to_load_from_cache(fake_hub.repo_id, "config.json", cache_dir=cache) == str(
        Path(d["snapshot"]) / "config.json")
    # a re-run is up to date and asks the hub nothing
    asked = len(fake_hub.requests)
    assert main(["run", "download"]) == 0
    assert len(fake_hub.requests) == asked


def test_the_gate_in_a_plain_shell_finds_the_download_fresh(tiny_env, fake_hub, monkeypatch):
    """Mirror, hub, offline switch and cache folder say where from, not what: `make gpu-complete-check` in a shell
    without HF_ENDPOINT / HF_HOME must not find the download stale."""
    from pipeline import engine
    from pipeline.stages import REGISTRY
    stage_env(monkeypatch, tiny_env, fake_hub)
    assert main(["run", "download"]) == 0
    plain = load_config(env={"PIPELINE_ROOT": str(tiny_env), "MODEL_TIER": "7b", "MODEL_NAME": fake_hub.repo_id,
                             "GPU_PROBE_FILE": "configs/probes/h100_80g.json"})
    stage = REGISTRY["download"]
    assert engine.status_of(stage, plain, engine.fingerprint(stage, plain, REGISTRY)[0]) == "ok"


def test_a_file_deleted_from_the_cache_makes_it_run_again_and_fetch_only_that_file(tiny_env, fake_hub, monkeypatch):
    stage_env(monkeypatch, tiny_env, fake_hub)
    assert main(["run", "download"]) == 0
    link = Path(doc(tiny_env)["snapshot"]) / "tokenizer.json"
    link.resolve().unlink()   # its blob, then the snapshot's link to it
    link.unlink()
    assert main(["run", "download"]) == 0
    assert [len(fake_hub.gets(n)) for n in ("config.json", "model.safetensors", "tokenizer.json")] == [1, 1, 2]
    assert sorted(doc(tiny_env)["already_cached"]) == ["config.json", "model.safetensors"]


def test_a_too_small_disk_is_one_line_naming_the_disk_and_writes_nothing(tiny_env, fake_hub, monkeypatch, capsys):
    cache = stage_env(monkeypatch, tiny_env, fake_hub)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(H.shutil, "disk_usage", lambda path: usage(2 << 30, (2 << 30) - (512 << 20), 512 << 20))
    assert main(["run", "download"]) == 1
    d = doc(tiny_env)
    assert d["status"] == "failed" and d["reason_code"] == "disk_full"
    reason = d["reason"]
    assert "\n" not in reason and "0.5 GB free" in reason and "HF_HOME" in reason and "/root/autodl-tmp" in reason
    assert f"disk {H.mount_point(tiny_env)}" in reason and "nothing was downloaded" in reason
    assert not cache.exists() and resolves(fake_hub) == []   # nothing fetched, nothing written in the cache
    assert "Traceback" not in capsys.readouterr().out


def test_a_real_small_tmpfs_is_named_as_the_disk_and_stays_empty(tiny_env, fake_hub, monkeypatch):
    disk = tiny_env / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]}); the test above covers it")
    try:
        stage_env(monkeypatch, tiny_env, fake_hub, HF_HOME=str(disk / "hf"))
        assert main(["run", "download"]) == 1
        reason = doc(tiny_env)["reason"]
        assert f"its disk {disk} has 0.0 GB free" in reason and "set HF_HOME" in reason and "\n" not in reason
        assert list(disk.iterdir()) == [] and resolves(fake_hub) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_offline_uses_the_cache_and_says_so_or_fails_in_one_line(tiny_env, fake_hub, monkeypatch):
    stage_env(monkeypatch, tiny_env, fake_hub, HF_HUB_OFFLINE="1")
    assert main(["run", "download"]) == 1
    d = doc(tiny_env)
    assert d["reason_code"] == "offline_cache_missing" and "\n" not in d["reason"]
    assert "HF_HUB_OFFLINE=1" in d["reason"] and "unset HF_HUB_OFFLINE" in d["reason"]
    assert fake_hub.requests == []
    hf_home = str(tiny_env / "hf")
    stage_env(monkeypatch, tiny_env / "a", fake_hub, HF_HOME=hf_home)   # online, another root: fill the cache
    assert main(["run", "download"]) == 0
    online, asked = doc(tiny_env / "a"), len(fake_hub.requests)
    stage_env(monkeypatch, tiny_env, fake_hub, HF_HUB_OFFLINE="1")      # offline again: the cache, nothing asked
    assert main(["run", "download"]) == 0
    d = doc(tiny_env)
    assert d["offline"] is True and "HF_HUB_OFFLINE=1" in d["source"] and len(fake_hub.requests) == asked
    assert {n: r["sha256"] for n, r in d["files"].items()} == {n: r["sha256"] for n, r in online["files"].items()}
    assert d["files"]["model.safetensors"]["verified"]   # against the blob's content address (its sha256)


@pytest.mark.parametrize("case, env, reason", [
    ("plan cannot train", {"GPU_PROBE_FILE": "configs/probes/t4_16g.json"}, "hardware plan: "),
    ("forced skip", {"FORCE_SKIP_TRAINING": "true"}, "FORCE_SKIP_TRAINING=true"),
    ("tiny tier", {"MODEL_TIER": "tiny", "MODEL_NAME": ""}, "the tiny tier builds it"),
    ("rehearsal", {"REHEARSAL": "true", "MODEL_NAME": ""}, "rehearsal: the tiny stand-in"),
    ("local folder", {"MODEL_NAME": "@folder"}, "the base model is local (a folder, "),
])
def test_nothing_is_downloaded_where_nothing_trains_the_hub_model(tiny_env, fake_hub, model_folder, monkeypatch, case,
                                                                  env, reason):
    stage_env(monkeypatch, tiny_env, fake_hub, **{k: str(model_folder) if v == "@folder" else v for k, v in env.items()})
    assert main(["run", "download"]) == 0
    d = doc(tiny_env)
    assert d["status"] == "skipped" and reason in d["reason"], d["reason"]
    assert fake_hub.requests == [] and not (tiny_env / "hf").exists()


def test_a_hub_id_on_the_tiny_tier_is_downloaded_on_the_cpu(tiny_env, fake_hub, monkeypatch):
    """'any tier when MODEL_NAME is a hub id': the tiny tier's CPU plan trains it, so it is fetched."""
    stage_env(monkeypatch, tiny_env, fake_hub, MODEL_TIER="tiny", GPU_PROBE_FILE="")
    monkeypatch.setattr("pipeline.hardware.probe", lambda: {
        "source": "live", "cuda_available": False, "torch_version": "2.13.0+cpu", "torch_cuda_build": None,
        "cuda_runtime": None, "torch_arch_list": None, "driver": None, "devices": [], "flash_attn": False,
        "flash_attn_error": None, "bitsandbytes": False, "bitsandbytes_error": None,
        "nvidia_smi": {"rows": []}, "errors": []})
    assert main(["run", "download"]) == 0
    assert doc(tiny_env)["status"] == "ok" and len(fake_hub.gets("model.safetensors")) == 1


def test_an_unknown_repo_is_one_line(tiny_env, fake_hub, monkeypatch):
    stage_env(monkeypatch, tiny_env, fake_hub, MODEL_NAME="medllm-test/no-such-model")
    assert main(["run", "download"]) == 1
    reason = doc(tiny_env)["reason"]
    assert "no-such-model is neither a local folder nor a model on http://127.0.0.1" in reason and "\n" not in reason


# ---- MODEL_HUB=modelscope, through a stand-in for the modelscope SDK ----------------------------------------------

def fake_modelscope(monkeypatch, source: Path, calls: list) -> None:
    """modelscope.snapshot_download / modelscope.hub.api.HubApi as the SDK spells them, copying from `source`."""
    def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None, **kw):
        calls.append({"model_id": model_id, "revision": revision, "local_dir": local_dir, "patterns": allow_patterns})
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for p in source.iterdir():
            if any(__import__("fnmatch").fnmatch(p.name, pat) for pat in allow_patterns):
                shutil.copy(p, Path(local_dir) / p.name)
        return local_dir

    class HubApi:
        def get_valid_revision(self, model_id, revision=None, **kw):
            return "master"

        def get_model_files(self, model_id, revision=None, recursive=True, **kw):
            return [{"Path": p.name, "Size": p.stat().st_size, "Type": "blob",
                     "Sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in source.iterdir()]

    ms, ms_hub, ms_api = (types.ModuleType(n) for n in ("modelscope", "modelscope.hub", "modelscope.hub.api"))
    ms.snapshot_download, ms_api.HubApi, ms.hub, ms_hub.api = snapshot_download, HubApi, ms_hub, ms_api
    for name, mod in (("modelscope", ms), ("modelscope.hub", ms_hub), ("modelscope.hub.api", ms_api)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_modelscope_fills_the_same_cache_layout(tiny_env, fake_hub, model_folder, monkeypatch):
    cache = stage_env(monkeypatch, tiny_env, fake_hub, MODEL_HUB="modelscope", MODEL_NAME="Qwen/Qwen2.5-7B-Instruct")
    calls: list = []
    fake_modelscope(monkeypatch, model_folder, calls)
    assert main(["run", "download"]) == 0
    d = doc(tiny_env)
    assert d["hub"] == "modelscope" and d["endpoint"] is None and d["revision"] == "master"
    assert calls == [{"model_id": "Qwen/Qwen2.5-7B-Instruct", "revision": "master", "patterns": H.patterns_for(
        ["model.safetensors"]), "local_dir": str(cache / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / "master")}]
    assert all(r["verified"] for r in d["files"].values()) and fake_hub.requests == []
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache("Qwen/Qwen2.5-7B-Instruct", "model.safetensors", cache_dir=cache)
    assert found and Path(found).read_bytes() == (model_folder / "model.safetensors").read_bytes()


def test_modelscope_not_installed_is_one_line_naming_the_install(tiny_env, fake_hub, monkeypatch):
    stage_env(monkeypatch, tiny_env, fake_hub, MODEL_HUB="modelscope")
    monkeypatch.setitem(sys.modules, "modelscope", None)   # import modelscope -> ImportError
    assert main(["run", "download"]) == 1
    d = doc(tiny_env)
    assert d["reason_code"] == "modelscope_missing" and "pip install modelscope" in d["reason"]
    assert "\n" not in d["reason"] and fake_hub.requests == []


# ---- settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var, value, needle", [
    ("MODEL_HUB", "foo", "use one of hf, modelscope"),
    ("HF_ENDPOINT", "hf-mirror.com", "e.g. https://hf-mirror.com"),
    ("HF_HUB_OFFLINE", "maybe", "cannot parse"),
])
def test_a_bad_hub_variable_is_one_line_naming_it(tmp_path, var, value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(env={"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "7b", var: value})
    assert f"environment variable {var}" in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


def test_the_hub_variables_reach_the_config(tmp_path):
    cfg = load_config(env={"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "7b", "HF_ENDPOINT": "https://hf-mirror.com",
                           "MODEL_HUB": "modelscope", "HF_HUB_OFFLINE": "1"})
    assert (cfg.runtime.hf_endpoint, cfg.model.hub, cfg.runtime.hf_hub_offline) == (
        "https://hf-mirror.com", "modelscope", True)


def test_the_endpoint_is_recorded_without_credentials():
    assert H.public_endpoint("https://user:secret@hf-mirror.com:8443/") == "https://hf-mirror.com:8443"

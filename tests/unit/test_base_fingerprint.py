"""The base model's content identity is part of every fingerprint that depends on it (issue 14 §2): weights
replaced inside a MODEL_NAME folder after training make SFT (and all downstream of it) stale, a hub base moved to
another revision does too, and a local build (tiny/demo) keeps one fingerprint whether or not it is built yet.
Hashing a 15 GB folder in every `make ls` would be a cost: an on-disk cache, keyed by each file's path, size,
mtime and inode, keeps the hashes across processes.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_base_fingerprint.py
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import engine, evidence as ev, models
from pipeline.settings import load_config
from pipeline.stages import REGISTRY


def _folder(path: Path, weights: bytes = b"weights-1") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def _fp(root: Path, stage: str = "sft", **env) -> str:
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root), **env})
    return engine.fingerprint(REGISTRY[stage], cfg, REGISTRY)[0]


def test_replaced_weights_in_a_model_name_folder_change_the_fingerprints_of_sft_and_what_follows(tmp_path):
    model = _folder(tmp_path / "qwen")
    before = {s: _fp(tmp_path / "root", s, MODEL_NAME=str(model)) for s in ("sft", "eval", "preflight")}
    (model / "model.safetensors").write_bytes(b"weights-2")   # same size, other bytes
    models._IDENTITIES.clear()                                 # another process
    after = {s: _fp(tmp_path / "root", s, MODEL_NAME=str(model)) for s in ("sft", "eval", "preflight")}
    assert all(before[s] != after[s] for s in before), (before, after)
    # the methods trained from SFT follow through their upstream: SFT's recorded fingerprint moves when it re-runs


def test_a_hub_base_at_another_revision_changes_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "hub_revision", lambda repo: "a" * 40)
    # a GPU tier's base is the hub id at the revision the cache holds
    cfg7 = load_config(tier="7b", env={"PIPELINE_ROOT": str(tmp_path)})
    a = models.base_content(cfg7)
    monkeypatch.setattr(models, "hub_revision", lambda repo: "b" * 40)
    b = models.base_content(cfg7)
    assert a != b and a["base_model"].endswith("a" * 40) and b["base_model"].endswith("b" * 40)


def test_a_local_build_keeps_its_fingerprint_before_and_after_it_is_built(tmp_path):
    root = tmp_path / "root"
    before = _fp(root)
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)})
    built = Path(models.base_for(cfg, build=True))
    assert built.is_dir()
    assert _fp(root) == before


def test_the_file_hashes_persist_across_processes_and_see_a_changed_file(tmp_path, monkeypatch):
    model = _folder(tmp_path / "qwen")
    cache = tmp_path / "cache" / "file_hashes.json"
    first = ev.sha256_tree_cached(model, cache)
    assert first == ev.sha256_tree(model) and cache.is_file()
    calls = []
    real = ev.sha256_file
    monkeypatch.setattr(ev, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    assert ev.sha256_tree_cached(model, cache) == first and calls == []   # nothing re-read
    (model / "model.safetensors").write_bytes(b"weights-2")
    os.utime(model / "model.safetensors", ns=(1, 1))                      # even with an odd mtime
    again = ev.sha256_tree_cached(model, cache)
    assert calls == ["model.safetensors"] and again["model.safetensors"] == real(model / "model.safetensors")


def test_a_broken_hash_cache_is_ignored_and_rewritten(tmp_path):
    model = _folder(tmp_path / "qwen")
    cache = tmp_path / "file_hashes.json"
    cache.write_text("{not json")
    assert ev.sha256_tree_cached(model, cache) == ev.sha256_tree(model)
    assert isinstance(ev.read_json(cache), dict)

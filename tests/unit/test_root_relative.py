"""A root that moves keeps its evidence: fingerprints, the base model's identity, the finals' adapter configs.
No model here (fake stages, fake model folders); the real tiny Day-1 moved is tests/e2e/test_moved_root.py.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_root_relative.py
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from pipeline import engine, evidence as ev, models, training_checks
from pipeline import gate as G
from pipeline.settings import load_config
from pipeline.stages import REGISTRY
from pipeline.training_record import portable_final
from tests.unit import fake_stages
from tests.unit.fake_stages import CALLS


def test_paths_inside_the_root_are_recorded_relative_to_it_and_others_as_given(tmp_path):
    root = tmp_path / "day1"
    assert ev.root_relative(root, root / ".cache" / "tiny-seed0") == ".cache/tiny-seed0"
    assert ev.root_relative(root, "Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert ev.root_relative(root, tmp_path / "models" / "qwen") == str(tmp_path / "models" / "qwen")
    assert ev.portable({"a": [str(root / "x.jsonl"), 3], "b": str(tmp_path / "day10")}, root) == \
        {"a": ["x.jsonl", 3], "b": str(tmp_path / "day10")}   # day10 is not inside day1


def _fake_day(root: Path, data: Path, overrides=()) -> tuple:
    registry = fake_stages.install(data, fake_a={"reads": ("sft", "data")})
    cfg = load_config(overrides=[f"data.sft_path={data}", *overrides])
    console = Console(file=io.StringIO(), width=250)
    return registry, cfg, console


def test_a_copied_root_keeps_every_fingerprint_and_nothing_reruns(tiny_env, tmp_path, monkeypatch):
    """An input file and a config path inside the root (fake_a reads `data`; data.sft_path names the file)."""
    old = tiny_env
    (old / "data.txt").write_text("row 1\n")
    registry, cfg, console = _fake_day(old, old / "data.txt")
    assert engine.run(["fake_c"], cfg, console, registry) == 0
    new = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(old, new)
    shutil.rmtree(old)   # moved, not copied: nothing may still point into the old root
    monkeypatch.setenv("PIPELINE_ROOT", str(new))
    registry, cfg, console = _fake_day(new, new / "data.txt")
    CALLS.clear()
    states = {s.name: engine.status_of(s, cfg, engine.fingerprint(s, cfg, registry)[0]) for s in registry.stages}
    assert states == dict.fromkeys(fake_stages.NAMES, "ok")
    assert engine.run(["fake_c"], cfg, console, registry) == 0 and sum(CALLS.values()) == 0
    doc = ev.read_json(new / fake_stages.evidence_rel("fake_a"))
    assert list(doc["inputs"]) == ["data.txt"] and str(old) not in json.dumps(doc)


def _model_folder(path: Path, weights: bytes = b"weights") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen2"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_the_base_identity_is_its_content_wherever_it_lies(tmp_path):
    a = _model_folder(tmp_path / "a" / "qwen")
    b = tmp_path / "b" / "qwen"
    shutil.copytree(a, b)
    assert models.base_model_identity(str(a)) == models.base_model_identity(str(b))
    (b / "model.safetensors").write_bytes(b"other!!")   # same size: the memo must see the change
    assert models.base_model_identity(str(a)) != models.base_model_identity(str(b))


def test_a_hub_base_is_identified_by_id_and_cached_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants
    commit = "a" * 40
    snap = tmp_path / "models--Qwen--Qwen2.5-7B-Instruct" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.base_model_identity("Qwen/Qwen2.5-7B-Instruct") == f"Qwen/Qwen2.5-7B-Instruct@{commit}"
    assert models.base_model_identity("Qwen/Qwen2.5-14B-Instruct") == "Qwen/Qwen2.5-14B-Instruct"   # not cached
    now = f"Qwen/Qwen2.5-7B-Instruct@{commit}"
    assert models.same_base(now, now)
    assert models.same_base("Qwen/Qwen2.5-7B-Instruct", now)   # evidence written before revisions were recorded
    assert not models.same_base(f"Qwen/Qwen2.5-7B-Instruct@{'b' * 40}", now)
    assert not models.same_base("Qwen/Qwen2.5-14B-Instruct", now) and not models.same_base(None, now)


def _base_check(root: Path, model: Path, doc: dict):
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root), "MODEL_NAME": str(model)})
    g = G.Gate(cfg, REGISTRY, G.probe_plan(root)).of(REGISTRY["sft"])
    return training_checks.check_base(g, doc)


def test_the_gate_follows_a_moved_model_folder_by_content_and_catches_replaced_weights(tmp_path):
    old = _model_folder(tmp_path / "system_disk" / "qwen")
    doc = {"base_model": str(old), "base_model_identity": models.base_model_identity(str(old))}
    new = tmp_path / "data_disk" / "qwen"
    shutil.move(old, new)
    check = _base_check(tmp_path / "root", new, doc)
    assert check.passed, check.detail
    (new / "model.safetensors").write_bytes(b"fine-tuned over")   # weights replaced after training
    check = _base_check(tmp_path / "root", new, doc)
    assert not check.passed and "files changed" in check.detail
    check = _base_check(tmp_path / "root", new, {"base_model": str(new)})
    assert not check.passed and "records no base_model_identity" in check.detail


def test_a_final_names_its_base_relative_to_the_root_and_a_hub_base_as_it_is(tmp_path):
    root = tmp_path / "day1"
    base = str(root / ".cache" / "tiny-seed0")
    final = root / "checkpoints" / "dpo-real-baseline" / "final"
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": base}))
    (final / "README.md").write_text(f"---\nbase_model: {base}\ntags:\n- base_model:adapter:{base}\n---\n")
    portable_final(final, root, base)
    written = json.loads((final / "adapter_config.json").read_text())
    assert written == {"r": 8, "base_model_name_or_path": ".cache/tiny-seed0"}
    assert str(root) not in (final / "README.md").read_text()
    assert "base_model: .cache/tiny-seed0\n" in (final / "README.md").read_text()
    hub = {"r": 8, "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}
    (final / "adapter_config.json").write_text(json.dumps(hub))
    portable_final(final, root, "Qwen/Qwen2.5-7B-Instruct")
    assert json.loads((final / "adapter_config.json").read_text()) == hub


@pytest.mark.parametrize("where", ["inside", "outside"])
def test_the_base_check_names_the_model_not_only_its_content(tmp_path, where):
    """A recorded hub id where the config names a folder fails even when the identity was copied across."""
    root = tmp_path / "root"
    model = _model_folder(root / "models" / "qwen" if where == "inside" else tmp_path / "qwen")
    ident = models.base_model_identity(str(model))
    recorded = {"base_model": ev.root_relative(root, model), "base_model_identity": ident}
    assert _base_check(root, model, recorded).passed
    check = _base_check(root, model, {"base_model": "Qwen/Qwen2.5-7B-Instruct", "base_model_identity": ident})
    assert not check.passed and "config names" in check.detail

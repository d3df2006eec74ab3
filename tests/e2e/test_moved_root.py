"""A finished Day-1 survives being moved: a copied root, a moved root and an unpacked `make export` pass the gate
exactly as the original, and `run all` finds every stage up to date there (nothing re-trains). Evidence names
things inside the root by root-relative paths and the base model by its content, never by where it was."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.__main__ import main
from pipeline.stages import REGISTRY
from scripts import export

GATE = "reports/migration/gpu_completion_check.json"


def _use_root(monkeypatch, env: dict, root: Path) -> None:
    for k, v in {**env, "PIPELINE_ROOT": str(root)}.items():
        monkeypatch.setenv(k, v)


def _passes_and_is_up_to_date(root: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["check"]) == 0, capsys.readouterr().out[-3000:]
    verdict = json.loads((root / GATE).read_text())
    assert verdict["strict_pass"] is True and verdict["failed"] == []
    capsys.readouterr()
    assert main(["run", "all"]) == 0
    out = capsys.readouterr().out
    stages = [s.name for s in REGISTRY.stages if s.in_all and not s.always_run]
    ran = [name for name in stages if f"✓ {name}: up to date" not in out]
    assert ran == [], f"re-ran in the moved root: {ran}\n{out[-3000:]}"


def _no_old_root_in_evidence(old: Path, new: Path) -> None:
    """Nothing the gate or a fingerprint compares may hold the old root. Logs may (they are for people), and so may
    the intermediate checkpoint-N folders (the trainer's resume state: `make export` leaves them out)."""
    held = [p.relative_to(new).as_posix() for p in new.rglob("*")
            if p.is_file() and p.suffix in (".json", ".md", "") and "logs" not in p.parts
            and not any(re.fullmatch(r"checkpoint-\d+", part) for part in p.parts) and p.name != ".pipeline.lock"
            and str(old) in p.read_text(errors="ignore")]
    assert held == [], f"files that name the old root {old}: {held}"


@contextlib.contextmanager
def _gone(root: Path, aside: Path):
    """The original root is not there (moved away) for the block, then back for the other tests."""
    shutil.move(root, aside)
    try:
        yield aside
    finally:
        shutil.move(aside, root)


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_root_passes_and_nothing_reruns(tiny_day1, day1_env, tmp_path, monkeypatch, capsys,
                                                          how):
    root, _, env = tiny_day1
    new = tmp_path / "data_disk" / "day1"
    new.parent.mkdir()
    if how == "copy":
        shutil.copytree(root, new, symlinks=True)
    with _gone(root, new) if how == "move" else contextlib.nullcontext():   # moved: nothing may point into root
        _use_root(monkeypatch, env, new)
        _passes_and_is_up_to_date(new, capsys)
        _no_old_root_in_evidence(root, new)


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_an_unpacked_export_passes_and_nothing_reruns(tiny_day1, day1_env, tmp_path, monkeypatch, capsys):
    root, _, env = tiny_day1
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    assert export.verify(archive) == []
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "other_machine", filter="data")
    new = tmp_path / "other_machine" / "day1"
    assert not (new / ".cache").exists(), "the export holds no model cache: the gate rebuilds the tiny base"
    with _gone(root, tmp_path / "original"):   # another machine: the original root and its cache are not there
        _use_root(monkeypatch, env, new)
        _passes_and_is_up_to_date(new, capsys)
        _no_old_root_in_evidence(root, new)

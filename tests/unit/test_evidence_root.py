"""One root hash over the evidence a thesis quotes and the finals (issue 14 §2): `make export` records it in the
archive (EVIDENCE_ROOT, listed in the manifest) and prints it; the summary and the thesis material quote it; the
gate checks the quoted one against the root; verify-export recomputes it from the archive. A moved root keeps it.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_evidence_root.py
"""
from __future__ import annotations

import shutil
import tarfile

from pipeline import root_hash
from pipeline.stages import REGISTRY
from scripts import export

FILES = {
    "reports/training/layer_b_tiny_sft_metrics.json": b'{"status": "ok"}',
    "reports/training/dpo_metrics.json": b'{"status": "ok"}',
    "reports/eval/eval_default.json": b'{"results": {}}',
    "reports/judge/judge_summary.json": b"{}",
    "reports/migration/gpu_check.json": b'{"probed": "another boot"}',     # re-probed on a later boot: not quoted
    "reports/thesis_support/thesis_draft_material.md": b"quotes the root",  # quotes it: cannot be inside it
    "reports/logs/sft.log": b"log",
    "checkpoints/layer_b/tiny_sft/final/adapter_model.safetensors": b"sft-weights",
    "checkpoints/dpo-real-baseline/final/adapter_model.safetensors": b"dpo-weights",
    "checkpoints/dpo-real-baseline/checkpoint-3/optimizer.pt": b"intermediate",
    "checkpoints/layer_b/tiny_sft.stale-0123456789abcdef/final/adapter_model.safetensors": b"another config",
}


def _root(path):
    for rel, data in FILES.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_the_root_covers_the_quoted_evidence_and_the_finals_only(tmp_path):
    root = _root(tmp_path / "day1")
    got = root_hash.of_root(root, REGISTRY)
    assert got["files"] == 6, got   # sft, dpo, eval, judge evidence + two finals
    before = got["sha256"]
    for rel in ("reports/migration/gpu_check.json", "reports/thesis_support/thesis_draft_material.md",
                "reports/logs/sft.log", "checkpoints/dpo-real-baseline/checkpoint-3/optimizer.pt"):
        (root / rel).write_bytes(b"changed")
        assert root_hash.of_root(root, REGISTRY)["sha256"] == before, rel
    for rel in ("reports/eval/eval_default.json", "checkpoints/dpo-real-baseline/final/adapter_model.safetensors"):
        (root / rel).write_bytes(b"forged")
        assert root_hash.of_root(root, REGISTRY)["sha256"] != before, rel


def test_a_moved_root_keeps_its_root_hash(tmp_path):
    a = _root(tmp_path / "a")
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert root_hash.of_root(a, REGISTRY) == root_hash.of_root(b, REGISTRY)


def test_export_records_and_prints_the_root_and_verify_recomputes_it(tmp_path, capsys):
    root = _root(tmp_path / "day1")
    want = root_hash.of_root(root, REGISTRY)["sha256"]
    archive = export.pack(root, tmp_path / "x.tar.gz")
    assert want in capsys.readouterr().out
    with tarfile.open(archive) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile()}
        assert tar.extractfile(members["EVIDENCE_ROOT"]).read().decode().split()[0] == want
        manifest = tar.extractfile(members["MANIFEST.sha256"]).read().decode()
    assert "  EVIDENCE_ROOT\n" in manifest
    assert export.verify(archive) == []


def test_verify_export_catches_a_root_file_that_does_not_match_the_archive(tmp_path):
    """A consistent forgery of the archive (file and manifest line rewritten) still changes the root: the hash
    quoted in the thesis no longer matches what verify-export prints."""
    root = _root(tmp_path / "day1")
    archive = export.pack(root, tmp_path / "x.tar.gz")
    quoted = root_hash.of_root(root, REGISTRY)["sha256"]
    (root / "reports/eval/eval_default.json").write_bytes(b'{"results": {"forged": 1}}')
    forged = export.pack(root, tmp_path / "y.tar.gz")
    assert export.verify(forged) == []   # self-consistent
    assert export.archive_root(forged) != quoted and export.archive_root(archive) == quoted


def test_the_gate_fails_a_report_that_quotes_another_root(tmp_path):
    root = _root(tmp_path / "day1")
    now = root_hash.of_root(root, REGISTRY)
    assert root_hash.problems(root, REGISTRY, now) == []
    assert root_hash.problems(root, REGISTRY, {**now, "sha256": "0" * 64})
    assert root_hash.problems(root, REGISTRY, None)   # a record without the field


def test_the_summary_quotes_the_root_of_a_run_that_trained(tmp_path):
    from pipeline import day1
    root = _root(tmp_path / "day1")
    steps = [{"name": "gpu-run", "status": "ok", "rc": 0, "seconds": 1, "log": "", "note": ""}]
    s = day1.day1_summary(root, steps, False, None, None)
    assert s["evidence_root"] == root_hash.of_root(root, REGISTRY)
    s["verdict"] = "x"
    assert s["evidence_root"]["sha256"] in day1.summary_markdown(s)


def test_a_temp_file_left_by_a_killed_atomic_write_is_ignored_not_a_permanent_failure(tmp_path):
    """Issue 14 §5: a kill -9 between atomic_write_text's mkstemp and its os.replace leaves `.<name>.<random>.tmp`
    beside the file (portable_final writes into a final this way): the final's re-hash called it an extra file, a
    checkpoint failure no re-run could clear."""
    from pipeline import evidence as ev
    final = tmp_path / "final"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    recorded = ev.sha256_tree(final)
    (final / ".adapter_config.json.k3j2h1.tmp").write_text('{"half')     # what the kill left
    assert ev.verify_tree(final, recorded)[1] == {}
    (final / "extra.safetensors").write_bytes(b"x")                       # a real extra file still counts
    assert ev.verify_tree(final, recorded)[1] == {"extra": ["extra.safetensors"]}

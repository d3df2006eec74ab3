"""make export / make verify-export: the round trip, what goes in, and a damaged archive named file by file."""
import gzip
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts import export

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "out"
    files = {
        "reports/eval_default.md": b"# eval\n",
        "reports/figures/sft_loss.png": b"\x89PNG fake",
        "reports/training/dpo_metrics.json": b"{}",
        "checkpoints/layer_b/tiny_sft/final/adapter_model.safetensors": bytes(range(256)),
        "checkpoints/layer_b/tiny_sft/final/adapter_config.json": b"{}",
        "checkpoints/dpo-real-baseline/final/adapter_model.safetensors": b"dpo",
        "checkpoints/layer_b/tiny_sft/checkpoint-4/adapter_model.safetensors": b"intermediate",
        "checkpoints/dpo-real-baseline/checkpoint-3/optimizer.pt": b"intermediate",
        "checkpoints/README.md": b"not a final",
    }
    for rel, data in files.items():
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_bytes(data)
    return r


def names(archive):
    with tarfile.open(archive) as tar:
        return sorted(m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile())


def rewrite(archive, out, change=None, drop=None, add=None):
    """Copy an archive member by member, changing, dropping or adding one file (the manifest is kept)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        top = src.getmembers()[0].name.split("/")[0]
        for m in src.getmembers():
            data = src.extractfile(m).read()
            rel = m.name.split("/", 1)[1]
            if rel == drop:
                continue
            if rel == change:
                data = data[:-1] + bytes([data[-1] ^ 1])
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
        if add:
            info = tarfile.TarInfo(f"{top}/{add}")
            info.size = 1
            dst.addfile(info, io.BytesIO(b"x"))
    return out


def test_pack_holds_reports_and_finals_only_and_verifies(root, tmp_path):
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    assert names(archive) == [
        "EVIDENCE_ROOT", "MANIFEST.sha256",
        "checkpoints/dpo-real-baseline/final/adapter_model.safetensors",
        "checkpoints/layer_b/tiny_sft/final/adapter_config.json",
        "checkpoints/layer_b/tiny_sft/final/adapter_model.safetensors",
        "reports/eval_default.md", "reports/figures/sft_loss.png", "reports/training/dpo_metrics.json",
    ]
    assert export.verify(archive) == []
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("day1/MANIFEST.sha256").read().decode()
    assert "  reports/eval_default.md\n" in manifest and len(manifest.splitlines()) == 7
    assert "  EVIDENCE_ROOT\n" in manifest   # the root hash file is itself in the manifest


@pytest.mark.parametrize("kind", ["change", "drop", "add"])
def test_a_damaged_archive_names_the_file(root, tmp_path, kind):
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    target = "checkpoints/layer_b/tiny_sft/final/adapter_model.safetensors"
    bad = rewrite(archive, tmp_path / "bad.tar.gz", **({"add": "reports/forged.json"} if kind == "add" else {kind: target}))
    problems = export.verify(bad)
    expected = {"change": f"changed: {target}", "drop": f"missing: {target}", "add": "extra: reports/forged.json"}[kind]
    assert problems[0] == expected
    if kind != "add":   # a final is inside the evidence root: the archive no longer gives the hash it states
        assert len(problems) == 2 and problems[1].startswith("EVIDENCE_ROOT states ")
    else:
        assert len(problems) == 1


def test_a_truncated_download_is_an_error_not_a_crash(root, tmp_path):
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    problems = export.verify(cut)
    assert len(problems) == 1 and "download it again" in problems[0]
    plain = tmp_path / "plain.tar.gz"
    plain.write_bytes(gzip.compress(b"not a tar"))
    assert export.verify(plain)


def test_cli_round_trip_uses_pipeline_root_and_exits_non_zero_on_damage(root, tmp_path):
    env = {"PIPELINE_ROOT": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "scripts.export", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True)
    packed = run("pack")
    assert packed.returncode == 0, packed.stderr
    archive = next((root / "exports").glob("medllm_day1_*.tar.gz"))
    assert run("verify", str(archive)).returncode == 0
    bad = rewrite(archive, tmp_path / "bad.tar.gz", change="reports/eval_default.md")
    checked = run("verify", str(bad))
    assert checked.returncode == 1 and "changed: reports/eval_default.md" in checked.stderr


def test_a_merged_folder_goes_in_only_as_its_parity_check_recorded_it(root, tmp_path, capsys):
    """checkpoints/<variant>/merged (make export-merged) is exported when reports/export/merge_parity.json records
    it as exported with these files; merged.failed, an unrecorded or a changed merged folder stay out."""
    import hashlib
    import json
    files = {"model.safetensors": b"weights", "config.json": b"{}"}
    for name in ("merged", "merged.failed"):
        for rel, data in files.items():
            (root / "checkpoints/dpo-real-baseline" / name).mkdir(parents=True, exist_ok=True)
            (root / "checkpoints/dpo-real-baseline" / name / rel).write_bytes(data)
    merged = [f"checkpoints/dpo-real-baseline/merged/{k}" for k in sorted(files)]
    assert not set(merged) & set(export.collect(root))
    assert "no passed parity check" in capsys.readouterr().err
    record = {"variants": {"dpo": {"status": "exported", "merged_dir": "checkpoints/dpo-real-baseline/merged",
                                   "files": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}}}}
    (root / "reports/export").mkdir(parents=True)
    (root / export.PARITY).write_text(json.dumps(record))
    got = export.collect(root)
    assert set(merged) <= set(got) and not any("merged.failed" in f for f in got)
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    assert export.verify(archive) == []
    (root / "checkpoints/dpo-real-baseline/merged/config.json").write_bytes(b'{"changed": 1}')
    assert not set(merged) & set(export.collect(root))
    assert "changed since its parity check" in capsys.readouterr().err

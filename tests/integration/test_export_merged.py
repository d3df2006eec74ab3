"""make export-merged on the shared tiny Day-1: each trained variant's merged folder answers like its adapter
(identical probe tokens, >= 0.97 answer agreement), loads with plain transformers (no PEFT), goes into
`make export`; a deliberately corrupted merge (one weight perturbed) is failed, kept aside and never exported.

One stage run serves the module (the shared Day-1 is restored afterwards): dpo's merge is corrupted, the others
are honest. Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m slow tests/integration/test_export_merged.py
(the stage run is in make test-slow; the two config tests run in make test)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import load_config
from pipeline.stages import REGISTRY
from scripts import export

REPO = Path(__file__).resolve().parents[2]
CORRUPTED = "dpo"
PARITY = "reports/export/merge_parity.json"


@pytest.fixture(scope="module")
def merged(tiny_day1):
    """(root, exit code, parity doc): export_merged run once on the shared Day-1, dpo's merge corrupted."""
    from pipeline.__main__ import main
    from pipeline.stages import export_merged
    from tests.conftest import _CLEARED
    root, backup, env = tiny_day1
    honest = export_merged.merge

    def corrupt_one(model, name):
        out = honest(model, name)
        if name == CORRUPTED:   # one merged weight perturbed: the final norm's sign, so greedy picks other tokens
            import torch
            with torch.no_grad():
                out.model.norm.weight.neg_()
        return out
    with pytest.MonkeyPatch.context() as mp:
        for var in _CLEARED:
            mp.delenv(var, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(export_merged, "merge", corrupt_one)
        code = main(["run", "export_merged"])
        yield root, code, json.loads((root / PARITY).read_text())
    shutil.rmtree(root)
    shutil.copytree(backup, root)


def honest_methods():
    return [m for m in REGISTRY.methods if m != CORRUPTED]


@pytest.mark.slow   # one export_merged run over the shared Day-1 (make test-slow)
def test_merged_folders_answer_like_their_adapters(merged):
    root, _, doc = merged
    eval_doc = json.loads((root / REGISTRY["eval"].evidence_path).read_text())
    n = {s: min(32, info["planned_n"]) for s, info in eval_doc["sets"].items()}
    assert {s: len(ids) for s, ids in doc["question_ids"].items()} == n
    assert doc["memory"]["max_live_models"] == 1 and doc["exported"] == honest_methods()
    for m in honest_methods():
        v, folder = doc["variants"][m], f"{REGISTRY[m].checkpoint(load_config(tier='tiny'))}/merged"
        assert v["status"] == "exported" and v["merged_dir"] == folder and (root / folder).is_dir(), m
        p = v["parity"]
        assert p["probe"]["identical"] and p["probe"]["adapter_ids"] == p["probe"]["merged_ids"], m
        assert p["answer_agreement"] >= 0.97 and p["first_token_agreement"] >= 0.97 and p["passed"], (m, p)
        assert p["n"] == sum(n.values()) and {s: p["per_set"][s]["n"] for s in n} == n
        assert not (root / folder / "adapter_config.json").exists()
        final = root / v["adapter_dir"]   # the chat template the adapter was trained with
        assert (root / folder / "chat_template.jinja").read_bytes() == (final / "chat_template.jinja").read_bytes()
        assert v["merge_base"]["quantization"] is None and v["dtype"] == "float32"


@pytest.mark.slow   # one export_merged run over the shared Day-1 (make test-slow)
def test_a_corrupted_merge_is_failed_kept_aside_and_not_exported(merged, tmp_path):
    root, code, doc = merged
    v = doc["variants"][CORRUPTED]
    home = REGISTRY[CORRUPTED].checkpoint(load_config(tier="tiny"))
    assert code == 1 and doc["status"] == "failed" and doc["failed"] == [CORRUPTED]
    assert CORRUPTED in doc["reason"] and "merged.failed" in doc["reason"]
    assert v["status"] == "failed" and not v["parity"]["passed"] and not v["parity"]["probe"]["identical"]
    assert v["merged_dir"] == f"{home}/merged.failed" and (root / home / "merged.failed").is_dir()
    assert not (root / home / "merged").exists()
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    with __import__("tarfile").open(archive) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers()]
    assert export.verify(archive) == []
    assert not any(n.startswith(f"{home}/") and "final" not in n for n in names)
    for m in honest_methods():
        folder = doc["variants"][m]["merged_dir"]
        assert sorted(n[len(folder) + 1:] for n in names if n.startswith(folder + "/")) == sorted(
            doc["variants"][m]["files"]), m


@pytest.mark.slow   # one export_merged run over the shared Day-1 (make test-slow)
def test_export_leaves_out_a_merged_folder_changed_after_its_check_and_verify_names_it(merged, tmp_path, capsys):
    root, _, doc = merged
    folder = doc["variants"]["sft"]["merged_dir"]
    archive = export.pack(root, tmp_path / "day1.tar.gz")
    forged = export.verify(export_rewrite(archive, tmp_path / "forged.tar.gz", f"{folder}/config.json"))
    assert any(p.startswith(f"merged: {folder}/config.json") for p in forged), forged
    config = root / folder / "config.json"
    saved = config.read_bytes()
    try:
        config.write_bytes(saved + b"\n")
        names = export.collect(root)
        assert not any(n.startswith(folder + "/") for n in names)
        assert f"{folder} left out (changed since its parity check)" in capsys.readouterr().err
    finally:
        config.write_bytes(saved)


def export_rewrite(archive, out, rel):
    """The archive with one member changed and the manifest rewritten to match (a consistent forgery)."""
    import hashlib
    import io
    import tarfile
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
        top = members[0][0].name.split("/")[0]
        data = {m.name: b for m, b in members}
        data[f"{top}/{rel}"] += b"\n"
        lines = "".join(f"{hashlib.sha256(b).hexdigest()}  {n.split('/', 1)[1]}\n" for n, b in data.items()
                        if not n.endswith(export.MANIFEST))
        data[f"{top}/{export.MANIFEST}"] = lines.encode()
        for name, b in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            dst.addfile(info, io.BytesIO(b))
    return out


@pytest.mark.slow   # one export_merged run over the shared Day-1 (make test-slow)
def test_a_merged_folder_loads_and_answers_with_plain_transformers_without_peft(merged):
    root, _, doc = merged
    v = doc["variants"]["sft"]
    script = f"""
import json, sys
sys.modules["peft"] = None   # no PEFT in this process: `import peft` fails, transformers sees it unavailable
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = {str(root / v["merged_dir"])!r}
model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
text = tok.apply_chat_template([{{"role": "user", "content": {v["parity"]["probe"]["prompt"]!r}}}], tokenize=False,
                               add_generation_prompt=True)
enc = tok(text, return_tensors="pt", add_special_tokens=False)
out = model.generate(**enc, max_new_tokens={v["parity"]["probe"]["tokens"]}, do_sample=False)
print(json.dumps({{"ids": out[0, enc["input_ids"].shape[1]:].tolist(), "eos": model.generation_config.eos_token_id,
                  "tok_eos": tok.eos_token_id}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ids"] == v["parity"]["probe"]["adapter_ids"]
    assert got["tok_eos"] in got["eos"] and got["eos"] == v["eos_token_id"]


def test_merge_final_adds_the_stage_to_run_all_and_the_plain_run_leaves_it_out(tmp_path):
    env = {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny"}
    plain = [s.name for s in REGISTRY.order(["all"], cfg=load_config(env=env))]
    merging = [s.name for s in REGISTRY.order(["all"], cfg=load_config(env=env | {"MERGE_FINAL": "true"}))]
    assert "export_merged" not in plain and merging == plain + ["export_merged"]


def test_merge_final_leaves_every_stage_up_to_date(tmp_path):
    """MERGE_FINAL only picks what `run all` runs: toggling it makes no stage stale (not even `reports`, which
    reads the whole config), so a gate run in a shell without it agrees with the run that had it."""
    from pipeline import engine
    env = {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny"}
    plain, merging = load_config(env=env), load_config(env=env | {"MERGE_FINAL": "true"})
    changed = [s.name for s in REGISTRY.stages
               if engine.fingerprint(s, plain, REGISTRY)[0] != engine.fingerprint(s, merging, REGISTRY)[0]]
    assert merging.export.merge_final and changed == []

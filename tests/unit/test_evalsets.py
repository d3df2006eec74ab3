"""Eval sets are modules in pipeline/evalsets/: the prompts did not change when they moved there, and a new set
is picked up by settings, the eval and dry-run stages, the fingerprint and the schema without edits elsewhere.

Run: .venv/bin/python -m pytest -q tests/unit/test_evalsets.py
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import jsonschema
import pytest

from pipeline import loglik
from pipeline import data as D
from pipeline import engine, evalkit, evalsets
from pipeline import evidence as ev
from pipeline.core import ScopedCfg
from pipeline.settings import ConfigError, load_config
from pipeline.stages import REGISTRY
from pipeline.stages import dry_run as DR
from pipeline.stages import eval as E

REPO = Path(__file__).resolve().parents[2]


def sha(prompt: list[dict]) -> str:
    """What the eval stage records as prompt_sha256."""
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False).encode()).hexdigest()


# --- the prompts and extraction before the move (stages/eval.py messages(), extract(), copied verbatim) -----
def old_messages(row: dict) -> list[dict]:
    if row["set"] == "pubmedqa":
        question, _, context = row["question"].partition("\n\n")
        text = f"Context: {context}\n\nQuestion: {question}\n\nAnswer yes, no or maybe."
    else:
        options = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
        tail = "请只回答选项字母。" if row["lang"] == "zh" else "Answer with the letter only."
        text = f"{row['question']}\n\n{options}\n\n{tail}"
    return [{"role": "user", "content": text}]


def old_extract(row: dict, raw: str) -> tuple[str | None, str]:
    if row["set"] == "pubmedqa":
        return evalkit.extract_yes_no_maybe(raw)
    return evalkit.extract_choice(raw, "ABCD", options=row["options"])


# sha256 of every bundled row's prompt (json list, in load order) and of a few single prompts, recorded with the
# code before the move
RECORDED_ALL = {"medqa": (1273, "b4008d902de47e5c4802eb9127e34b1b8b331286484d8ea4b6128cca3a7b1034"),
                "pubmedqa": (500, "4b24e06e75a38e481051116ed8373a58fd8cfda42d20347fd813632ca5cf3623"),
                "cmmlu": (1815, "e41c2924799cbae93e63b056dc4ba77e083684384650a031046538ef3a6d40ae")}
RECORDED = {"medqa/0": "26ef279e2993f44ad396148dbbc882be2aa004b39893143cfcd8414370e3b84e",
            "medqa/1272": "ff677dfbc262b7410e13325296b132f25ba1337eb5ab1cac16600c803ed1f69b",
            "pubmedqa/12377809": "84d3ab9cfad8c8cef306488798a04387ed4f1881fecbb45f040a412625c6b9e4",
            "pubmedqa/26134053": "5b387749594e1ad0423488eb5c186317aaf05176ec1b306cc96d41e147ef4ac5",
            "cmmlu/anatomy/0": "2cf8396fb4e2c96cc216a6cc961eba8ffa383f557d3f201861c7f6e2dc526ac8",
            "cmmlu/virology/168": "18a17fbefdd232416926f2f4e46db01a9aa059f22f379a1c36db6c726bd83f58"}
RAWS = ["A", "b", "The answer is C.", "答案：D", "(B) because", "A or B", "yes", "No.", "Maybe, the data",
        "是", "", "I cannot tell", "Option C: the liver"]


@pytest.fixture(scope="module")
def bundled():
    cfg = load_config(tier="tiny", env={})
    return cfg, {name: evalsets.SETS[name].load(cfg)[0] for name in evalsets.NAMES}


def test_names_is_the_only_list_and_every_module_has_the_interface():
    assert tuple(evalsets.SETS) == evalsets.NAMES == evalsets.names() == ("medqa", "pubmedqa", "cmmlu")
    for name, mod in evalsets.SETS.items():
        assert mod.NAME == name
        assert all(callable(getattr(mod, f)) for f in ("files", "load", "prompt", "extract")), name
        assert mod.reads and all(k.startswith("data.") for k in mod.reads), name
    assert set(evalsets.reads()) == {"data.medqa_path", "data.pubmedqa_path", "data.pubmedqa_test_ids",
                                     "data.cmmlu_dir", "data.on_bad_row"}


def test_every_prompt_of_every_bundled_row_is_what_the_old_code_produced(bundled):
    _, sets = bundled
    for name, rows in sets.items():
        mod = evalsets.SETS[name]
        assert (len(rows), sha([mod.prompt(r) for r in rows])) == RECORDED_ALL[name], name
        assert [mod.prompt(r) for r in rows] == [old_messages(r) for r in rows], name
        assert [E.messages(r) for r in rows[:50]] == [old_messages(r) for r in rows[:50]], name
    by_id = {r["id"]: r for rows in sets.values() for r in rows}
    assert {i: sha(E.messages(by_id[i])) for i in RECORDED} == RECORDED


def test_extraction_is_what_the_old_code_did(bundled):
    _, sets = bundled
    for name, rows in sets.items():
        for row in rows[:5]:
            texts = list(row["options"].values()) if isinstance(row["options"], dict) else []
            for raw in RAWS + texts:
                assert E.extract(row, raw) == old_extract(row, raw), (name, row["id"], raw)
                assert evalsets.SETS[name].extract(row, raw) == old_extract(row, raw)


def test_the_fallbacks_allowed_answers_are_unchanged(bundled):
    _, sets = bundled
    for name, rows in sets.items():
        old = list(rows[0]["options"]) if name == "pubmedqa" else list("ABCD")
        assert E.allowed(rows[0]) == old


def test_files_are_those_of_the_configured_sets_only(bundled):
    cfg, _ = bundled
    every = evalsets.files(cfg)
    assert [p.name for p in every[:3]] == ["test.jsonl", "ori_pqal.json", "test_ground_truth.json"]
    assert len(every) == 3 + len(list(cfg.data_path(cfg.data.cmmlu_dir).glob("*.csv")))
    only = load_config(tier="tiny", env={}, overrides=["eval.sets=[pubmedqa]"])
    assert [p.name for p in evalsets.files(only)] == ["ori_pqal.json", "test_ground_truth.json"]
    names = [p.name for p in engine.input_files(REGISTRY["eval"], only)]
    tasks = sorted(p.name for p in loglik.TASKS_DIR.iterdir() if p.is_file() and p.suffix != ".pyc")
    assert names == ["ori_pqal.json", "test_ground_truth.json", *tasks]   # + the loglik protocol's task definitions
    assert "medllm_pubmedqa.yaml" in tasks and "bundled.py" in tasks


# --- a new set: a module object added to a copy of the set list, nothing else edited ------------------
def fake_set(path) -> types.ModuleType:
    """A 'usmle_mini' set: its own data file (no config key), MedQA's loader, its own prompt and extraction."""
    mod = types.ModuleType("usmle_mini")
    mod.NAME = "usmle_mini"
    mod.reads = ("data.on_bad_row",)

    def files(cfg):
        return [cfg.data_path(str(path))]

    def load(cfg):
        rows, report = D.load_medqa(cfg.data_path(str(path)), cfg.data.on_bad_row, source=str(path))
        return [{**r, "set": mod.NAME, "id": r["id"].replace("medqa/", "usmle_mini/")} for r in rows], [report]

    def prompt(row):
        return [{"role": "user", "content": f"Q: {row['question']} ({'/'.join(row['options'])})"}]

    def extract(row, raw):
        letter = raw.strip()[:1].upper()
        return (letter, "rule:first_letter") if letter in row["options"] else (None, "no_letter")
    mod.files, mod.load, mod.prompt, mod.extract = files, load, prompt, extract
    return mod


@pytest.fixture
def with_fake(tmp_path, monkeypatch):
    path = tmp_path / "usmle_mini.jsonl"
    rows = [{"realidx": i, "question": f"Question {i}?", "options": {k: f"{k}{i}" for k in "ABCD"},
             "answer_idx": "ABCD"[i % 4], "meta_info": "step1"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    fake = fake_set(path)
    monkeypatch.setattr(evalsets, "SETS", {**evalsets.SETS, fake.NAME: fake})
    cfg = load_config(tier="tiny", env={}, overrides=["eval.sets=[medqa,usmle_mini]",
                                                      "eval.sample_sizes={medqa: 3, usmle_mini: 2}"])
    return cfg, path


def test_settings_accept_a_new_set_and_still_refuse_unknown_ones(with_fake):
    cfg, _ = with_fake
    assert cfg.eval.sets == ["medqa", "usmle_mini"]
    with pytest.raises(ConfigError, match="usmle_maxi.*use medqa, pubmedqa, cmmlu, usmle_mini"):
        load_config(tier="tiny", env={}, overrides=["eval.sets=[usmle_maxi]"])


def test_the_eval_loop_picks_up_a_new_set(with_fake):
    cfg, path = with_fake
    stage = REGISTRY["eval"]
    assert path in engine.input_files(stage, cfg)          # its file enters the eval fingerprint
    scoped = ScopedCfg(cfg, stage, inputs=engine.input_files(stage, cfg))
    sets = E.load_sets(scoped)                              # the declared-inputs check lets it read its file
    assert list(sets) == ["medqa", "usmle_mini"]
    rows, full = sets["usmle_mini"]
    assert full == 5 and len(rows) == 2 and all(r["id"].startswith("usmle_mini/") for r in rows)
    assert E.messages(rows[0]) == [{"role": "user", "content": f"Q: {rows[0]['question']} (A/B/C/D)"}]
    assert E.extract(rows[0], " c, surely") == ("C", "rule:first_letter")
    preds = [{"id": r["id"], "set": r["set"], "subject": r["subject"], "raw": raw, "extracted": x, "method": m,
              "gold": r["answer"], "correct": x == r["answer"]}
             for r in sets["medqa"][0] + rows for raw in ["A"] for x, m in [E.extract(r, raw)]]
    summary = E.summarize(preds, cfg)
    assert set(summary) == {"medqa", "usmle_mini"} and summary["usmle_mini"]["n"] == 2


def test_the_dry_run_loads_and_reports_a_new_set(with_fake):
    cfg, path = with_fake
    stage = REGISTRY["dry_run"]
    assert path in engine.input_files(stage, cfg)
    loaded = DR.load_all(ScopedCfg(cfg, stage, inputs=engine.input_files(stage, cfg)))
    assert loaded["reports"]["usmle_mini"]["n_rows"] == 5 and len(loaded["eval"]["usmle_mini"]) == 5
    assert "usmle_mini" in DR.overlaps(loaded) and "pubmedqa" not in loaded["eval"]


def test_the_eval_schema_takes_any_set_name_a_module_can_have():
    schema = ev.load_schema("eval")
    sets_schema = json.loads(json.dumps(schema["allOf"][1]["properties"]["sets"]))
    entry = {"planned_n": 2, "full_size": 5, "question_ids": ["usmle_mini/0", "usmle_mini/1"], "seed": 1}
    jsonschema.validate({name: entry for name in (*evalsets.NAMES, "usmle_mini")}, sets_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"Not A Module": entry}, sets_schema)


def test_settings_and_the_set_modules_import_no_torch():
    code = ("import sys, pipeline.settings, pipeline.evalsets\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr

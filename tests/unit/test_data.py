"""pipeline.data on the bundled files and on malformed inputs.  Run: python -m pytest tests/unit/test_data.py -x -q"""

import hashlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline import data as d
from pipeline.data import DataError

DATA = Path(__file__).resolve().parents[2] / "data"
SFT = DATA / "medicalgpt_medical_sft_zh_1k" / "medical_sft_1K_format.jsonl"
REWARD = DATA / "medicalgpt_medical_reward_zh_100" / "test.json"
MEDQA = DATA / "medqa_usmle_4opt_test" / "test.jsonl"
CMMLU = DATA / "cmmlu_medical_zh"
PUBMEDQA_ORI = DATA / "pubmedqa_pqal" / "ori_pqal.json"
PUBMEDQA_TEST = DATA / "pubmedqa_pqal" / "test_ground_truth.json"


# ---- the bundled data -----------------------------------------------------------------------

def test_bundle_has_a_source_note_per_dataset_and_a_readme_naming_each():
    folders = sorted(p for p in DATA.iterdir() if p.is_dir())
    assert len(folders) == 5
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for folder in folders:
        assert (folder / "SOURCE.md").is_file(), folder
        assert folder.name in readme
    assert "CC BY-NC-SA 4.0" in readme and "DISCLAIMER" in readme


@pytest.mark.parametrize("path", [SFT, REWARD, MEDQA, PUBMEDQA_ORI, PUBMEDQA_TEST], ids=lambda p: p.name)
def test_bundled_files_have_the_byte_size_their_source_note_records(path):
    note = (path.parent / "SOURCE.md").read_text(encoding="utf-8")
    sizes = {int(s.replace(",", "")) for s in re.findall(r"(\d{1,3}(?:,\d{3})+) (?:and|bytes)", note)}
    assert path.stat().st_size in sizes


def test_sft_loads_1000_sharegpt_conversations_as_user_assistant_messages():
    rows, report = d.load_sft(SFT)
    assert len(rows) == report.n_rows == 1000 and report.n_skipped == 0
    assert rows[0]["id"] == "sft-1" and rows[-1]["id"] == "sft-1000"
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    assert report.sha256 == hashlib.sha256(SFT.read_bytes()).hexdigest()
    assert report.to_dict()["path"] == str(SFT)


def test_reward_file_loads_100_pairs_despite_the_json_extension():
    pairs, report = d.load_preferences(REWARD)
    assert len(pairs) == 100 and set(pairs[0]) == {"id", "prompt", "chosen", "rejected"}
    first = json.loads(REWARD.read_text(encoding="utf-8").splitlines()[0])
    assert pairs[0]["prompt"] == first["question"] and pairs[0]["rejected"] == first["response_rejected"]


def test_unpair_gives_one_desirable_and_one_undesirable_row_per_pair():
    pairs, _ = d.load_preferences(REWARD)
    rows = d.unpair(pairs)
    assert len(rows) == 200 and Counter(r["label"] for r in rows) == {True: 100, False: 100}
    assert rows[0] == {"id": "pref-1-chosen", "prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True}
    assert rows[1]["id"] == "pref-1-rejected" and rows[1]["completion"] == pairs[0]["rejected"]


def test_medqa_loads_1273_questions_by_step():
    rows, _ = d.load_medqa(MEDQA)
    assert len(rows) == 1273
    assert Counter(r["subject"] for r in rows) == {"step1": 679, "step2&3": 594}
    assert Counter(r["answer"] for r in rows) == {"A": 353, "B": 309, "C": 346, "D": 265}
    assert rows[0]["id"] == "medqa/0" and rows[0]["lang"] == "en" and list(rows[0]["options"]) == ["A", "B", "C", "D"]


def test_cmmlu_loads_1815_questions_over_9_subjects():
    rows, reports = d.load_cmmlu(CMMLU)
    assert len(rows) == 1815 and len(reports) == 9
    assert Counter(r["subject"] for r in rows) == {
        "anatomy": 148, "clinical_knowledge": 237, "college_medical_statistics": 106, "college_medicine": 273,
        "genetics": 176, "nutrition": 145, "professional_medicine": 376, "traditional_chinese_medicine": 185,
        "virology": 169}
    assert rows[0]["id"] == "cmmlu/anatomy/0" and rows[0]["answer"] == "A" and rows[0]["lang"] == "zh"
    same, _ = d.load_cmmlu(sorted(CMMLU.glob("*.csv")))
    assert same == rows


def test_pubmedqa_keeps_only_the_500_official_test_pmids():
    rows, reports = d.load_pubmedqa(PUBMEDQA_ORI, PUBMEDQA_TEST)
    assert len(rows) == 500 and [r.n_rows for r in reports] == [500, 500]
    assert Counter(r["answer"] for r in rows) == {"yes": 276, "no": 169, "maybe": 55}
    test_ids = json.loads(PUBMEDQA_TEST.read_text())
    assert {r["id"] for r in rows} == {f"pubmedqa/{pmid}" for pmid in test_ids}
    ori = json.loads(PUBMEDQA_ORI.read_text())
    first = ori[rows[0]["id"].split("/")[1]]
    assert rows[0]["question"].startswith(first["QUESTION"]) and first["CONTEXTS"][-1] in rows[0]["question"]
    assert rows[0]["options"] == ["yes", "no", "maybe"]


def test_bundled_reward_prompts_do_not_overlap_the_sft_prompts():
    sft, _ = d.load_sft(SFT)
    pairs, _ = d.load_preferences(REWARD)
    overlap = d.prompt_overlap([r["messages"][0]["content"] for r in sft], [p["prompt"] for p in pairs])
    assert overlap == {"n_train": 1000, "n_eval": 100, "n_overlap": 0, "examples": []}


# ---- other formats ----------------------------------------------------------------------------

def test_messages_and_alpaca_formats_are_detected_and_converted(tmp_path):
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}]}) + "\n")
    rows, _ = d.load_sft(messages)
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Translate", "input": "hola", "output": "hello"}) + "\n\n"
                      + json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    rows, _ = d.load_sft(alpaca)
    assert rows[0]["messages"] == [{"role": "user", "content": "Translate\n\nhola"}, {"role": "assistant", "content": "hello"}]
    assert rows[1]["id"] == "sft-3" and rows[1]["messages"][0]["content"] == "Say hi"


def test_kto_and_trl_style_preferences_load(tmp_path):
    kto = tmp_path / "kto.jsonl"
    kto.write_text('{"prompt": "p", "completion": "c", "label": true}\n{"prompt": "p", "completion": "d", "label": false}\n')
    rows, _ = d.load_kto(kto)
    assert [r["label"] for r in rows] == [True, False]
    prefs = tmp_path / "p.jsonl"
    prefs.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n')
    assert d.load_preferences(prefs)[0] == [{"id": "pref-1", "prompt": "p", "chosen": "good", "rejected": "bad"}]


# ---- sampling and overlap ---------------------------------------------------------------------

def test_sample_rows_is_deterministic_and_keeps_the_original_order():
    rows = [{"id": i} for i in range(100)]
    a, b = d.sample_rows(rows, 10, seed=1), d.sample_rows(rows, 10, seed=1)
    assert a == b and len(a) == 10 and a == sorted(a, key=lambda r: r["id"])
    assert d.sample_rows(rows, 10, seed=2) != a
    assert d.sample_rows(rows, None, seed=1) == rows and d.sample_rows(rows, 500, seed=1) == rows


def test_split_heldout_is_deterministic_and_disjoint():
    rows = [{"id": i} for i in range(50)]
    train, held = d.split_heldout(rows, 5, seed=3)
    assert (train, held) == d.split_heldout(rows, 5, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert {r["id"] for r in train} | {r["id"] for r in held} == set(range(50))
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert d.split_heldout(rows, 5, seed=4)[1] != held
    with pytest.raises(ValueError, match="n_heldout=50"):
        d.split_heldout(rows, 50, seed=3)


def test_prompt_overlap_ignores_whitespace_differences():
    result = d.prompt_overlap(["What is  aspirin?\n", "other"], ["What is aspirin?", "new", " other "])
    assert result["n_overlap"] == 2 and result["examples"] == ["What is aspirin?", "other"]


# ---- malformed input: every error names file, line and field ----------------------------------

GOOD_ORI = {"1": {"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "yes"},
            "2": {"QUESTION": "q2?", "CONTEXTS": ["c2"], "final_decision": "no"}}
GOOD_TRUTH = {"1": "yes", "2": "no"}
SHAREGPT_OK = '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
MEDQA_OK = {"realidx": 1, "question": "q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
            "answer": "b", "answer_idx": "B", "meta_info": "step1"}
CMMLU_HEAD = ",Question,A,B,C,D,Answer\n"

LOADERS = {
    "sft": lambda t: d.load_sft(t / "sft.jsonl"),
    "pref": lambda t: d.load_preferences(t / "prefs.json"),
    "kto": lambda t: d.load_kto(t / "kto.jsonl"),
    "medqa": lambda t: d.load_medqa(t / "medqa.jsonl"),
    "cmmlu": lambda t: d.load_cmmlu([t / "anatomy.csv"]),
    "pubmedqa": lambda t: d.load_pubmedqa(t / "ori_pqal.json", t / "test_ground_truth.json"),
}


def _msgs(*turns):
    return json.dumps({"messages": [dict(zip(("role", "content"), t)) for t in turns]})


def _medqa(**change):
    return json.dumps({**MEDQA_OK, **change})


def _pubmedqa(ori=None, truth=None):
    return {"ori_pqal.json": json.dumps(ori or GOOD_ORI, indent=1), "test_ground_truth.json": json.dumps(truth or GOOD_TRUTH)}


OK_MSGS = _msgs(("user", "q"), ("assistant", "a"))
BAD = [  # (id, loader, {file: content}, "file:line" expected, field expected)
    ("sft-bad-json", "sft", {"sft.jsonl": OK_MSGS + '\n{"messages": [\n'}, "sft.jsonl:2", "(whole line)"),
    ("sft-array-line", "sft", {"sft.jsonl": OK_MSGS + "\n[1, 2]\n"}, "sft.jsonl:2", "(whole line)"),
    ("sft-missing-content", "sft", {"sft.jsonl": OK_MSGS + '\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}\n'},
     "sft.jsonl:2", "messages[1].content"),
    ("sft-content-not-str", "sft", {"sft.jsonl": OK_MSGS + "\n" + _msgs(("user", 5), ("assistant", "a"))}, "sft.jsonl:2", "messages[0].content"),
    ("sft-empty-content", "sft", {"sft.jsonl": "\n" + _msgs(("user", "q"), ("assistant", "  "))}, "sft.jsonl:2", "messages[1].content"),
    ("sft-unknown-role", "sft", {"sft.jsonl": _msgs(("doctor", "q"), ("assistant", "a"))}, "sft.jsonl:1", "messages[0].role"),
    ("sft-messages-not-list", "sft", {"sft.jsonl": OK_MSGS + '\n{"messages": "hi"}'}, "sft.jsonl:2", "messages"),
    ("sft-messages-empty", "sft", {"sft.jsonl": OK_MSGS + '\n{"messages": []}'}, "sft.jsonl:2", "messages"),
    ("sft-no-assistant", "sft", {"sft.jsonl": OK_MSGS + "\n" + OK_MSGS + "\n" + _msgs(("user", "q"))}, "sft.jsonl:3", "messages"),
    ("sharegpt-unknown-from", "sft", {"sft.jsonl": SHAREGPT_OK + '\n{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}'},
     "sft.jsonl:2", "conversations[1].from"),
    ("sharegpt-mixed-format", "sft", {"sft.jsonl": SHAREGPT_OK + "\n" + OK_MSGS}, "sft.jsonl:2", "conversations"),
    ("alpaca-missing-output", "sft", {"sft.jsonl": '{"instruction": "do"}'}, "sft.jsonl:1", "output"),
    ("alpaca-input-not-str", "sft", {"sft.jsonl": '{"instruction": "do", "input": 3, "output": "done"}'}, "sft.jsonl:1", "input"),
    ("sft-unknown-format", "sft", {"sft.jsonl": '{"text": "hello"}'}, "sft.jsonl:1", "messages"),
    ("sft-not-utf8", "sft", {"sft.jsonl": OK_MSGS.encode() + b"\n\xff\xfe\n"}, "sft.jsonl:2", "(encoding)"),
    ("pref-missing-rejected", "pref", {"prefs.json": '{"question": "q", "response_chosen": "a"}'}, "prefs.json:1", "response_rejected"),
    ("pref-chosen-not-str", "pref", {"prefs.json": '{"prompt": "q", "chosen": ["a"], "rejected": "b"}'}, "prefs.json:1", "chosen"),
    ("pref-identical", "pref", {"prefs.json": '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a "}'},
     "prefs.json:2", "rejected"),
    ("pref-empty-prompt", "pref", {"prefs.json": '{"prompt": "", "chosen": "a", "rejected": "b"}'}, "prefs.json:1", "prompt"),
    ("kto-label-string", "kto", {"kto.jsonl": '{"prompt": "p", "completion": "c", "label": "yes"}'}, "kto.jsonl:1", "label"),
    ("kto-label-missing", "kto", {"kto.jsonl": '{"prompt": "p", "completion": "c", "label": true}\n{"prompt": "p", "completion": "c"}'},
     "kto.jsonl:2", "label"),
    ("kto-empty-completion", "kto", {"kto.jsonl": '{"prompt": "p", "completion": " ", "label": false}'}, "kto.jsonl:1", "completion"),
    ("medqa-answer-not-option", "medqa", {"medqa.jsonl": _medqa(answer_idx="E")}, "medqa.jsonl:1", "answer_idx"),
    ("medqa-option-missing", "medqa", {"medqa.jsonl": _medqa(options={"A": "a", "B": "b", "C": "c"})}, "medqa.jsonl:1", "options"),
    ("medqa-option-empty", "medqa", {"medqa.jsonl": _medqa(options={"A": "a", "B": "b", "C": "", "D": "d"})}, "medqa.jsonl:1", "options.C"),
    ("medqa-realidx-str", "medqa", {"medqa.jsonl": _medqa(realidx="1")}, "medqa.jsonl:1", "realidx"),
    ("medqa-answer-text-disagrees", "medqa", {"medqa.jsonl": _medqa(answer="c")}, "medqa.jsonl:1", "answer"),
    ("medqa-duplicate-id", "medqa", {"medqa.jsonl": _medqa() + "\n" + _medqa()}, "medqa.jsonl:2", "id"),
    ("medqa-empty-question", "medqa", {"medqa.jsonl": _medqa(question="\n")}, "medqa.jsonl:1", "question"),
    ("cmmlu-wrong-header", "cmmlu", {"anatomy.csv": "Question,A,B,C,D,Answer\nq,a,b,c,d,A\n"}, "anatomy.csv:1", "(header)"),
    ("cmmlu-answer-not-option", "cmmlu", {"anatomy.csv": CMMLU_HEAD + "0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n"}, "anatomy.csv:3", "Answer"),
    ("cmmlu-short-row", "cmmlu", {"anatomy.csv": CMMLU_HEAD + "0,q,a,b,c\n"}, "anatomy.csv:2", "(row)"),
    ("cmmlu-empty-option", "cmmlu", {"anatomy.csv": CMMLU_HEAD + "0,q,a, ,c,d,A\n"}, "anatomy.csv:2", "B"),
    ("pubmedqa-pmid-missing", "pubmedqa", _pubmedqa(truth={"1": "yes", "999": "no"}), "test_ground_truth.json:PMID 999", "PMID"),
    ("pubmedqa-bad-label", "pubmedqa", _pubmedqa(truth={"1": "perhaps"}), "test_ground_truth.json:PMID 1", "label"),
    ("pubmedqa-label-disagrees", "pubmedqa", _pubmedqa(truth={"1": "yes", "2": "maybe"}), "ori_pqal.json:PMID 2", "final_decision"),
    ("pubmedqa-no-contexts", "pubmedqa", _pubmedqa(ori={**GOOD_ORI, "1": {"QUESTION": "q?", "CONTEXTS": []}}), "ori_pqal.json:PMID 1", "CONTEXTS"),
    ("pubmedqa-bad-json", "pubmedqa", {**_pubmedqa(), "ori_pqal.json": '{\n "1": {\n  "QUESTION": "q?",,\n'}, "ori_pqal.json:3", "(whole file)"),
]


def _write(tmp_path, files):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))


@pytest.mark.parametrize("loader, files, where, field_name", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_malformed_input_names_file_line_and_field(tmp_path, loader, files, where, field_name):
    _write(tmp_path, files)
    with pytest.raises(DataError) as caught:
        LOADERS[loader](tmp_path)
    message = str(caught.value)
    assert f"{where}: field '{field_name}':" in message
    assert message.endswith(".") and "\n" not in message


def test_skip_mode_drops_bad_rows_counts_them_and_logs_each(tmp_path, caplog):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([OK_MSGS, "{oops", OK_MSGS, _msgs(("robot", "x"), ("assistant", "a")), OK_MSGS]) + "\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        rows, report = d.load_sft(path, on_bad_row="skip")
    assert [r["id"] for r in rows] == ["sft-1", "sft-3", "sft-5"]
    assert (report.n_rows, report.n_skipped) == (3, 2)
    assert [s["where"] for s in report.skipped] == [f"{path}:2", f"{path}:4"]
    assert "messages[0].role" in report.skipped[1]["reason"]
    assert len(caplog.records) == 2 and f"{path}:4" in caplog.records[1].getMessage()


def test_skip_mode_logs_at_most_20_lines_plus_a_count(tmp_path, caplog):
    path = tmp_path / "kto.jsonl"
    path.write_text('{"prompt": "p", "completion": "c", "label": true}\n' + '{"prompt": "p"}\n' * 25)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        rows, report = d.load_kto(path, on_bad_row="skip")
    assert len(rows) == 1 and report.n_skipped == 25 and len(report.skipped) == 25
    assert len(caplog.records) == 21 and "5 more" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("content", ["", "\n\n", "{bad\n[]\n"], ids=["empty", "blank-lines", "all-bad"])
def test_an_empty_dataset_is_an_error_even_in_skip_mode(tmp_path, content):
    path = tmp_path / "prefs.json"
    path.write_text(content)
    with pytest.raises(DataError, match=r"prefs\.json: empty preference dataset"):
        d.load_preferences(path, on_bad_row="skip")


def test_a_header_only_cmmlu_file_is_an_empty_dataset(tmp_path):
    (tmp_path / "virology.csv").write_text(CMMLU_HEAD)
    with pytest.raises(DataError, match="virology.csv: empty CMMLU dataset"):
        d.load_cmmlu(tmp_path)


def test_missing_file_names_the_setting_that_points_at_it(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found \(it is set by data\.sft_path\)"):
        d.load_sft(tmp_path / "nope.jsonl", source="data.sft_path")
    with pytest.raises(DataError, match="no \\*.csv files"):
        d.load_cmmlu(tmp_path)


def test_unknown_on_bad_row_and_format_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="use one of error, skip"):
        d.load_medqa(MEDQA, on_bad_row="ignore")
    with pytest.raises(ValueError, match="fmt='chatml'"):
        d.load_sft(SFT, fmt="chatml")

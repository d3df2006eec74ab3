"""Data shapes that would silently change meaning (issue 14 §4) are an error or are honoured, never dropped:
duplicated JSON keys, Alpaca `history` and `system`, conversations that start with the assistant, fields a
loader does not read (listed in the load report), and held-out sizes that do not fit the file (one line naming
the keys, in the SFT stage as in the dry run).

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_data_shapes.py
"""
from __future__ import annotations

import json

import pytest

from pipeline import data as d
from pipeline.data import DataError


def _file(tmp_path, rows, name="sft.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                 encoding="utf-8")
    return p


def test_a_duplicated_json_key_is_an_error_naming_the_line_and_key(tmp_path):
    p = _file(tmp_path, ['{"instruction": "q1", "output": "a1"}',
                         '{"instruction": "q2", "output": "first answer", "output": "second answer"}'])
    with pytest.raises(DataError) as e:
        d.load_sft(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and "'output'" in msg and "twice" in msg and "\n" not in msg


def test_a_duplicated_key_in_a_preference_pair_is_an_error_too(tmp_path):
    p = _file(tmp_path, ['{"prompt": "q", "chosen": "good", "rejected": "bad", "chosen": "worse"}'], "pref.jsonl")
    with pytest.raises(DataError, match=r"pref.jsonl:1.*'chosen'.*twice"):
        d.load_preferences(p)


def test_alpaca_history_and_system_are_honoured_as_earlier_turns(tmp_path):
    p = _file(tmp_path, [{"instruction": "And the dose?", "input": "", "output": "500 mg twice a day.",
                          "system": "You are a careful physician.",
                          "history": [["What treats strep throat?", "Penicillin or amoxicillin."]]}])
    rows, _ = d.load_sft(p)
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You are a careful physician."},
        {"role": "user", "content": "What treats strep throat?"},
        {"role": "assistant", "content": "Penicillin or amoxicillin."},
        {"role": "user", "content": "And the dose?"},
        {"role": "assistant", "content": "500 mg twice a day."}]


@pytest.mark.parametrize("history", [["not a pair"], [["only the question"]], "a string", [["q", 3]]])
def test_a_malformed_alpaca_history_is_an_error_naming_it(tmp_path, history):
    p = _file(tmp_path, [{"instruction": "q", "output": "a", "history": history}])
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'history"):
        d.load_sft(p)


@pytest.mark.parametrize("row", [
    {"messages": [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "How can I help?"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]},
    {"conversations": [{"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "ok"}]},
], ids=["messages", "after_system", "sharegpt"])
def test_a_conversation_that_starts_with_the_assistant_is_an_error(tmp_path, row):
    p = _file(tmp_path, [row])
    with pytest.raises(DataError) as e:
        d.load_sft(p)
    assert "sft.jsonl:1" in str(e.value) and "starts with the assistant" in str(e.value)


def test_fields_no_loader_reads_are_listed_in_the_load_report(tmp_path):
    p = _file(tmp_path, [{"instruction": "q1", "output": "a1", "category": "cardio"},
                         {"instruction": "q2", "output": "a2", "category": "derm", "lang": "en"},
                         {"instruction": "q3", "output": "a3"}])
    rows, report = d.load_sft(p)
    assert len(rows) == 3 and report.ignored_fields == {"category": 2, "lang": 1}


def test_held_out_sizes_larger_than_the_file_name_the_keys_in_the_sft_stage(tmp_path):
    from pipeline import training as T
    from pipeline.core import StageFailed
    from pipeline.settings import load_config
    data = _file(tmp_path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)])
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(tmp_path / "root")},
                      overrides=[f"data.sft_path={data}", "data.sft_eval_size=9", "data.judge_heldout_size=1"])
    with pytest.raises(StageFailed) as e:
        T.sft_splits(cfg)
    assert "data.sft_eval_size=9" in str(e.value) and "data.judge_heldout_size=1" in str(e.value)


QWEN25_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4}


@pytest.mark.parametrize("r, targets, says", [
    (64, ["q_proj", "k_proj", "v_proj"], None),
    (512, ["q_proj", "k_proj"], None),
    (1024, ["q_proj", "k_proj"], "lora.r=1024 exceeds the width of k_proj (512)"),
    (1024, ["q_proj", "o_proj"], None),
    (4096, "all-linear", "lora.r=4096 exceeds the width of k_proj (512)"),
])
def test_a_lora_rank_is_held_against_each_target_modules_width(r, targets, says, tmp_path):
    from pipeline.settings import load_config
    from pipeline.trainer_args import lora_rank_problem
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(tmp_path)}, overrides=[f"lora.r={r}"])
    cfg.lora.target_modules = targets
    problem = lora_rank_problem(cfg, QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct")
    assert (problem is None) if says is None else (says in problem and "Qwen/Qwen2.5-7B-Instruct" in problem)

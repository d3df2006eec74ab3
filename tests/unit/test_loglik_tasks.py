"""Our lm-eval task definitions (pipeline/evalsets/lm_eval_tasks/) against lm-eval's own medqa_4options, pubmedqa and
cmmlu_<subject> tasks: on bundled rows mapped into the hub copies' schemas, lm-eval's own task gives the same
zero-shot prompt, choices, gold label and requests as ours on the same rows in our files' schema; and on every
bundled row our task's gold is the set loader's answer. No model, no dataset hub.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/unit/test_loglik_tasks.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from pipeline import evalsets, loglik  # noqa: E402
from pipeline.settings import load_config  # noqa: E402

LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
OWN = {"medqa": "medqa/medqa.yaml", "pubmedqa": "pubmedqa/pubmedqa.yaml", "cmmlu": "cmmlu/cmmlu_{subject}.yaml"}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return load_config(tier="tiny", env={"PIPELINE_ROOT": str(tmp_path_factory.mktemp("loglik_tasks"))})


@pytest.fixture(scope="module")
def rows(cfg):
    return {name: evalsets.SETS[name].load(cfg)[0] for name in evalsets.names()}


def hub_doc(row: dict, cfg) -> dict:
    """The bundled row as the hub copy lm-eval's own task reads has it (GBaker/MedQA-USMLE-4-options-hf,
    bigbio/pubmed_qa source schema, haonan-li/cmmlu)."""
    if row["set"] == "medqa":
        return {"sent1": row["question"], "sent2": "", "label": "ABCD".index(row["answer"]),
                **{f"ending{i}": row["options"][k] for i, k in enumerate("ABCD")}}
    if row["set"] == "pubmedqa":
        ori = json.loads(cfg.data_path(cfg.data.pubmedqa_path).read_text(encoding="utf-8"))
        return ori[row["id"].split("/")[1]]
    return {"Question": row["question"], **row["options"], "Answer": row["answer"]}


def own_task(row: dict, docs: list[dict]):
    """lm-eval's own task for the row's set (its installed YAML, includes and functions resolved), reading `docs`
    instead of the hub dataset; its few-shot splits dropped (zero-shot: they are never read)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    spec = load_yaml(LM_EVAL_TASKS / OWN[row["set"]].format(subject=row["subject"]), resolve_func=True)
    spec.pop("tag", None), spec.pop("group", None)
    spec.update(custom_dataset=lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
                dataset_path=None, dataset_name=None, training_split=None, validation_split=None, fewshot_split=None,
                fewshot_config=None, num_fewshot=0)
    return ConfigurableTask(config=spec)


def picked(rows: dict) -> list[dict]:
    """A few rows of each set, CMMLU's from three subjects, one of them traditional Chinese medicine."""
    cm = rows["cmmlu"]
    return rows["medqa"][:3] + rows["pubmedqa"][:3] + [next(r for r in cm if r["subject"] == s) for s in
                                                      ("anatomy", "traditional_chinese_medicine", "virology")]


def test_our_tasks_give_lm_evals_own_prompt_choices_gold_and_requests(cfg, rows):
    sample = picked(rows)
    tasks = loglik.tasks_for(cfg, sample)
    assert set(tasks.replicates.values()) >= {"medqa_4options", "pubmedqa", "cmmlu_anatomy"}
    for row in sample:
        name = tasks.where[row["id"]]
        ours = tasks.loaded["tasks"][name]
        doc = next(d for d in ours.eval_docs if evalsets.of(row).lm_eval_id(name, d) == row["id"])
        own = own_task(row, [hub_doc(row, cfg)])
        theirs = own.eval_docs[0]
        assert ours.fewshot_context(doc, 0) == own.fewshot_context(theirs, 0), row["id"]
        assert ours.doc_to_choice(doc) == own.doc_to_choice(theirs) == list(row["options"])
        assert ours.doc_to_target(doc) == own.doc_to_target(theirs), row["id"]
        ctx = ours.fewshot_context(doc, 0)
        mine = [i.args for i in ours.construct_requests(doc, ctx, metadata=(name, 0, 1))]
        want = [i.args for i in own.construct_requests(theirs, ctx, metadata=(name, 0, 1))]
        assert mine == want and len(mine) == len(row["options"])
        assert set(ours._metric_fn_list) == set(own._metric_fn_list)
        gold = loglik.choice_index(ours.doc_to_choice(doc), ours.doc_to_target(doc))
        assert ours.doc_to_choice(doc)[gold] == row["answer"]
    assert "答案：" in own_task(sample[-1], [hub_doc(sample[-1], cfg)]).fewshot_context(hub_doc(sample[-1], cfg), 0)


def test_every_bundled_row_is_one_doc_of_its_task_with_the_loaders_gold(cfg, rows):
    """All 1273 + 500 + CMMLU rows: found by id, doc_to_target is the loader's answer, choices its options."""
    every = [r for name in evalsets.names() for r in rows[name]]
    tasks = loglik.tasks_for(cfg, every)
    assert sum(len(v) for v in tasks.samples.values()) == len(every) > 3000
    by_id = {r["id"]: r for r in every}
    for name, task in tasks.loaded["tasks"].items():
        for doc in task.eval_docs:
            row = by_id[tasks.sets[name].lm_eval_id(name, doc)]
            choices = task.doc_to_choice(doc)
            assert choices == list(row["options"]) and choices[loglik.choice_index(choices, task.doc_to_target(doc))] \
                == row["answer"], row["id"]


def test_a_subject_without_a_task_definition_is_one_clear_error(cfg, rows):
    from pipeline.core import StageFailed
    row = dict(rows["cmmlu"][0], subject="astronomy", id="cmmlu/astronomy/0")
    with pytest.raises(StageFailed, match=r"no lm-eval task definition medllm_cmmlu_astronomy: add lm_eval_tasks/"):
        loglik.tasks_for(cfg, [row])


def test_rescoring_follows_lm_evals_argmax_and_per_character_norm():
    item = {"choices": ["yes", "no", "maybe"], "target": 2, "loglik": [-3.0, -2.9, -4.0], "acc_norm": None}
    assert loglik.rescore_item(item) == {"extracted": "no", "acc": 0.0, "acc_norm": 1.0}   # -4/5 > -2.9/2
    tie = {"choices": ["A", "B"], "target": 0, "loglik": [-1.0, -1.0]}
    assert loglik.rescore_item(tie) == {"extracted": "A", "acc": 1.0}                     # first maximum, as numpy

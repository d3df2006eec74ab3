"""PubMedQA-L, the official test PMIDs (English): the abstract as context, yes / no / maybe answers."""
from __future__ import annotations

from pathlib import Path

from pipeline import data as D
from pipeline import evalkit

NAME = "pubmedqa"
SPLIT = "test"   # the split published figures must share to stand beside ours (pipeline/anchors.py)
reads = ("data.pubmedqa_path", "data.pubmedqa_test_ids", "data.on_bad_row")


def files(cfg) -> list[Path]:
    return [cfg.data_path(cfg.data.pubmedqa_path), cfg.data_path(cfg.data.pubmedqa_test_ids)]


def load(cfg) -> tuple[list[dict], list]:
    return D.load_pubmedqa(cfg.data_path(cfg.data.pubmedqa_path), cfg.data_path(cfg.data.pubmedqa_test_ids),
                           cfg.data.on_bad_row, source="data.pubmedqa_path")


def prompt(row: dict) -> list[dict]:
    question, _, context = row["question"].partition("\n\n")
    text = f"Context: {context}\n\nQuestion: {question}\n\nAnswer yes, no or maybe."
    return [{"role": "user", "content": text}]


def free_prompt(row: dict) -> list[dict]:
    """Protocol free_answer_extraction: answered freely, concluding with yes, no or maybe."""
    question, _, context = row["question"].partition("\n\n")
    text = (f"Context: {context}\n\nQuestion: {question}\n\nAnswer the question. End your answer with "
            "\"The answer is yes\", \"The answer is no\" or \"The answer is maybe\".")
    return [{"role": "user", "content": text}]


def extract(row: dict, raw: str) -> tuple[str | None, str]:
    return evalkit.extract_yes_no_maybe(raw)


# the loglik protocol (pipeline/loglik.py): lm-eval's pubmedqa over our files (lm_eval_tasks/<task>.yaml)
def lm_eval_task(row: dict) -> str:
    return "medllm_pubmedqa"


def lm_eval_data(cfg, row: dict) -> dict:
    return {"ori_path": str(cfg.data_path(cfg.data.pubmedqa_path)),
            "test_ids_path": str(cfg.data_path(cfg.data.pubmedqa_test_ids))}


def lm_eval_id(task: str, doc: dict) -> str:
    return f"pubmedqa/{doc['PMID']}"

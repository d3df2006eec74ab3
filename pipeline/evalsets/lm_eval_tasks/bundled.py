"""The doc functions of our lm-eval task definitions (the YAMLs beside this file name them with !function).

Each replicates lm-eval's own function for the task it copies, over our bundled file's field names:
  medqa_doc_to_text / medqa_doc_to_target  lm_eval/tasks/medqa/preprocess_medqa.py (hub fields sent1, ending0-3,
                                           label; ours question, options.A-D, answer_idx)
  pubmedqa_doc_to_text                     lm_eval/tasks/pubmedqa/preprocess_pubmedqa.py (the same field names)
  pubmedqa_dataset                         the 500 test PMIDs of ori_pqal.json as rows (lm-eval's custom_dataset)
tests/unit/test_loglik_tasks.py holds each against lm-eval's own function on bundled rows mapped into its schema.
lm-eval imports this file by its path; it imports nothing of the pipeline.
"""
from __future__ import annotations

import json

LETTERS = ("A", "B", "C", "D")


def medqa_doc_to_text(doc: dict) -> str:
    answers = "".join(f"{k}. {doc['options'][k]}\n" for k in LETTERS)
    return f"Question: {doc['question']}\n{answers}Answer:"


def medqa_doc_to_target(doc: dict) -> int:
    return LETTERS.index(doc["answer_idx"])


def pubmedqa_doc_to_text(doc: dict) -> str:
    ctxs = "\n".join(doc["CONTEXTS"])
    return "Abstract: {}\nQuestion: {}\nAnswer:".format(ctxs, doc["QUESTION"])


def pubmedqa_dataset(ori_path: str, test_ids_path: str, **_metadata):
    """{"test": rows}: each test PMID's ori_pqal.json entry (the fields lm-eval's pubmedqa reads, named as the file
    and the bigbio source schema name them) plus PMID, in test_ground_truth.json's order (lm-eval calls this with the
    task's dataset_kwargs and its metadata)."""
    import datasets
    with open(ori_path, encoding="utf-8") as f:
        ori = json.load(f)
    with open(test_ids_path, encoding="utf-8") as f:
        test = json.load(f)
    rows = [{"PMID": pmid, "QUESTION": ori[pmid]["QUESTION"], "CONTEXTS": list(ori[pmid]["CONTEXTS"]),
             "final_decision": ori[pmid]["final_decision"]} for pmid in test]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

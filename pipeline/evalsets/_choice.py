"""Shared by the four-option multiple-choice sets (MedQA, CMMLU): the prompts (the letter only; a free answer)
and the letter extraction."""
from __future__ import annotations

from pipeline import evalkit


def prompt(row: dict) -> list[dict]:
    options = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
    tail = "请只回答选项字母。" if row["lang"] == "zh" else "Answer with the letter only."
    text = f"{row['question']}\n\n{options}\n\n{tail}"
    return [{"role": "user", "content": text}]


def free_prompt(row: dict) -> list[dict]:
    """Protocol free_answer_extraction: the question and options, answered freely, concluding with the letter."""
    options = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
    tail = ("请回答这道题，并在最后写出“答案是X”（X为正确选项的字母）。" if row["lang"] == "zh" else
            "Answer the question. End your answer with \"The answer is X\", X being the letter of the correct option.")
    return [{"role": "user", "content": f"{row['question']}\n\n{options}\n\n{tail}"}]


def extract(row: dict, raw: str) -> tuple[str | None, str]:
    return evalkit.extract_choice(raw, "ABCD", options=row["options"])

"""Shared by the four-option multiple-choice sets (MedQA, CMMLU): the prompt and the letter extraction."""
from __future__ import annotations

from pipeline import evalkit


def prompt(row: dict) -> list[dict]:
    options = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
    tail = "请只回答选项字母。" if row["lang"] == "zh" else "Answer with the letter only."
    text = f"{row['question']}\n\n{options}\n\n{tail}"
    return [{"role": "user", "content": text}]


def extract(row: dict, raw: str) -> tuple[str | None, str]:
    return evalkit.extract_choice(raw, "ABCD", options=row["options"])

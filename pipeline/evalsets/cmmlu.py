"""CMMLU, its medical subjects (Chinese): every CSV in data.cmmlu_dir (pipeline.data.load_cmmlu), letters."""
from __future__ import annotations

from pathlib import Path

from pipeline import data as D
from pipeline.evalsets._choice import extract, free_prompt, prompt

NAME = "cmmlu"
SPLIT = "test"   # the split published figures must share to stand beside ours (pipeline/anchors.py)
reads = ("data.cmmlu_dir", "data.on_bad_row")
__all__ = ["NAME", "SPLIT", "reads", "files", "load", "prompt", "free_prompt", "extract", "lm_eval_task",
           "lm_eval_data", "lm_eval_id"]


def files(cfg) -> list[Path]:
    folder = cfg.data_path(cfg.data.cmmlu_dir)
    return sorted(folder.glob("*.csv")) if folder.is_dir() else [folder]


def load(cfg) -> tuple[list[dict], list]:
    return D.load_cmmlu(cfg.data_path(cfg.data.cmmlu_dir), cfg.data.on_bad_row, source="data.cmmlu_dir")


# the loglik protocol (pipeline/loglik.py): lm-eval's cmmlu_<subject> over our CSV (lm_eval_tasks/<task>.yaml)
TASK_PREFIX = "medllm_cmmlu_"


def lm_eval_task(row: dict) -> str:
    return TASK_PREFIX + row["subject"]


def lm_eval_data(cfg, row: dict) -> dict:
    folder = cfg.data_path(cfg.data.cmmlu_dir)
    return {"data_files": {"test": str(folder / f"{row['subject']}.csv" if folder.is_dir() else folder)}}


def lm_eval_id(task: str, doc: dict) -> str:
    """CMMLU's unnamed first column (the row index) is "Unnamed: 0" once the csv builder (pandas) has read it."""
    return f"cmmlu/{task.removeprefix(TASK_PREFIX)}/{int(doc['Unnamed: 0'])}"

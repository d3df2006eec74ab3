"""MedQA-USMLE, 4 options (English): pipeline.data.load_medqa, letter answers."""
from __future__ import annotations

from pathlib import Path

from pipeline import data as D
from pipeline.evalsets._choice import extract, free_prompt, prompt

NAME = "medqa"
SPLIT = "test"   # the split published figures must share to stand beside ours (pipeline/anchors.py)
reads = ("data.medqa_path", "data.on_bad_row")
__all__ = ["NAME", "SPLIT", "reads", "files", "load", "prompt", "free_prompt", "extract"]


def files(cfg) -> list[Path]:
    return [cfg.data_path(cfg.data.medqa_path)]


def load(cfg) -> tuple[list[dict], list]:
    path = cfg.data_path(cfg.data.medqa_path)
    rows, report = D.load_medqa(path, cfg.data.on_bad_row, source="data.medqa_path")
    return rows, [report]

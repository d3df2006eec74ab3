"""CMMLU, its medical subjects (Chinese): every CSV in data.cmmlu_dir (pipeline.data.load_cmmlu), letters."""
from __future__ import annotations

from pathlib import Path

from pipeline import data as D
from pipeline.evalsets._choice import extract, free_prompt, prompt

NAME = "cmmlu"
SPLIT = "test"   # the split published figures must share to stand beside ours (pipeline/anchors.py)
reads = ("data.cmmlu_dir", "data.on_bad_row")
__all__ = ["NAME", "SPLIT", "reads", "files", "load", "prompt", "free_prompt", "extract"]


def files(cfg) -> list[Path]:
    folder = cfg.data_path(cfg.data.cmmlu_dir)
    return sorted(folder.glob("*.csv")) if folder.is_dir() else [folder]


def load(cfg) -> tuple[list[dict], list]:
    return D.load_cmmlu(cfg.data_path(cfg.data.cmmlu_dir), cfg.data.on_bad_row, source="data.cmmlu_dir")

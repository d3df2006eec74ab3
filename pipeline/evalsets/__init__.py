"""The evaluation sets: one small module per set in this folder, listed once in NAMES.

A set's module defines
    NAME                    the set's name (eval.sets, eval.sample_sizes, the evidence, the reports)
    SPLIT                   the split its questions come from ("test"): a published figure must share it
    reads                   the config keys it reads, e.g. ("data.medqa_path", "data.on_bad_row")
    files(cfg) -> [Path]    the data files it reads (they enter the fingerprint of every stage that loads it)
    load(cfg) -> (rows, [LoadReport])   through the pipeline.data loaders (errors name file:line and field)
    prompt(row) -> messages             the chat messages the model answers (their sha256 is recorded)
    free_prompt(row) -> messages        the same question for a free answer (protocol free_answer_extraction)
    extract(row, raw) -> (answer | None, method)   the answer a model's output commits to, by rules
    lm_eval_task(row) -> str             the lm-eval task (lm_eval_tasks/<task>.yaml) that scores the row (loglik)
    lm_eval_data(cfg, row) -> dict       that task's dataset_kwargs for the configured data file(s)
    lm_eval_id(task, doc) -> str         the row id of one of that task's docs

Everything that iterates eval sets (settings' validation, the eval and dry-run stages, reports, bench) asks
SETS; a new set is its module here, its name in NAMES and its data file(s). Light on purpose: no torch.
"""
from __future__ import annotations

import importlib
from pathlib import Path

NAMES = ("medqa", "pubmedqa", "cmmlu")   # the only list of eval sets, in report order

SETS = {name: importlib.import_module(f"{__name__}.{name}") for name in NAMES}


def names() -> tuple[str, ...]:
    """The known set names, in order (asked at call time, so a test can hand in a copy of SETS)."""
    return tuple(SETS)


def of(row: dict):
    """The module of an eval row."""
    return SETS[row["set"]]


def files(cfg) -> list[Path]:
    """The data files of the configured sets (cfg.eval.sets), in set order. A name no module has (settings
    refuses it; a test may hash such a config) has no files."""
    return [p for name in cfg.eval.sets if name in SETS for p in SETS[name].files(cfg)]


def reads() -> tuple[str, ...]:
    """The config keys any set reads (the data.* part of a loading stage's `reads`)."""
    return tuple(dict.fromkeys(key for mod in SETS.values() for key in mod.reads))

"""Data loaders: SFT, preference, KTO and the three evaluation sets -> one internal form.

Every loader reads the file once, hashes exactly the bytes it parsed, and returns
``(rows, LoadReport)``. A malformed row raises ``DataError`` naming ``file:line``, the field and
the fix; with ``on_bad_row="skip"`` it is skipped, counted in the report and logged instead.
An empty result is always an error.

Internal forms
    SFT          {"id": "sft-<line>", "messages": [{"role": "system"|"user"|"assistant", "content"}]}
    preferences  {"id": "pref-<line>", "prompt", "chosen", "rejected"}
    KTO          {"id": "kto-<line>", "prompt", "completion", "label": bool}
    evaluation   {"id", "set", "subject", "question", "options", "answer", "lang"}
                 medqa:    id "medqa/<realidx>", subject = meta_info (step1 | step2&3), options {"A".."D"}
                 cmmlu:    id "cmmlu/<subject>/<row index>", subject = CSV file stem, options {"A".."D"}
                 pubmedqa: id "pubmedqa/<pmid>", subject "reasoning_required" (PubMedQA's setting: the
                           question plus its abstract contexts, without the long answer),
                           options ["yes", "no", "maybe"]

The shared reading layer is pipeline/data_read.py, the evaluation-set loaders pipeline/data_bench.py; both are
re-exported here, so ``data.load_medqa``, ``data.DataError`` etc. stay where they were. This module holds the
training loaders (SFT, preferences, KTO), the sampling/splitting/overlap helpers and files().
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.data_bench import (   # re-exported (__all__)
    CMMLU_HEADER, LETTERS, PUBMEDQA_LABELS, load_cmmlu, load_medqa, load_pubmedqa)
from pipeline.data_read import (   # re-exported (__all__)
    MAX_LOGGED_SKIPS, ON_BAD_ROW, DataError, LoadReport, _check_mode, _collect, _error, _jsonl_records,
    _parse_object, _read, _text)

__all__ = ["CMMLU_HEADER", "LETTERS", "PUBMEDQA_LABELS", "load_cmmlu", "load_medqa", "load_pubmedqa",
           "MAX_LOGGED_SKIPS", "ON_BAD_ROW", "DataError", "LoadReport", "SFT_FORMATS", "PREF_FORMATS",
           "ROLES", "SHAREGPT_ROLES", "load_sft", "load_preferences", "load_kto", "unpair", "sample_rows",
           "split_heldout", "prompt_overlap", "files"]


SFT_FORMATS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
PREF_FORMATS = {"trl": ("prompt", "chosen", "rejected"),
                "medicalgpt": ("question", "response_chosen", "response_rejected")}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
READS = {"alpaca": {"instruction", "input", "output", "history", "system"}, "messages": {"messages"},
         "sharegpt": {"conversations", "system"}}   # the fields each SFT format's loader reads (others: reported)


# ---- training data ------------------------------------------------------------------------

def _detect(records: list[tuple[str, str]], formats: dict, fmt: str, argument: str) -> str | None:
    """The format named by fmt, or (fmt="auto") the one whose key the first parseable row carries."""
    if fmt != "auto":
        if fmt not in formats:
            raise ValueError(f"{argument}={fmt!r} is not a known format; use auto or one of {', '.join(formats)}.")
        return fmt
    for where, line in records:
        try:
            record = _parse_object(where, line)
        except DataError:
            continue
        for name, keys in formats.items():
            first_key = keys if isinstance(keys, str) else keys[0]
            if first_key in record:
                return name
    return None


def _sft_messages(where: str, record: dict, fmt: str | None) -> list[dict]:
    if fmt is None:
        raise _error(where, "messages", "no row in the file has 'messages', 'conversations' or 'instruction'",
                     "Use the messages, sharegpt or alpaca format")
    if fmt == "alpaca":
        instruction = _text(where, record, "instruction")
        extra = _text(where, record, "input", allow_empty=True) if "input" in record else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [*_system(where, record), *_history(where, record), {"role": "user", "content": user},
                {"role": "assistant", "content": _text(where, record, "output")}]

    if fmt == "messages":
        key, role_key, content_key = "messages", "role", "content"
    else:
        key, role_key, content_key = "conversations", "from", "value"
    roles = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    turns = record.get(key)
    if key not in record:
        raise _error(where, key, f"missing (the file is in {fmt} format, detected from its first valid row)",
                     f"Add '{key}' or keep one format per file")
    if not isinstance(turns, list) or not turns:
        raise _error(where, key, "expected a non-empty list of turns", f"Store the turns as a JSON list under '{key}'")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _error(where, f"{key}[{i}]", f"expected an object, got {type(turn).__name__}",
                         f"Write each turn as {{\"{role_key}\": ..., \"{content_key}\": ...}}")
        role = _text(where, turn, role_key, f"{key}[{i}].{role_key}")
        if role not in roles:
            raise _error(where, f"{key}[{i}].{role_key}", f"unknown role {role!r}", f"Use one of {', '.join(roles)}")
        content = _text(where, turn, content_key, f"{key}[{i}].{content_key}")
        messages.append({"role": SHAREGPT_ROLES.get(role, role), "content": content})
    spoken = {m["role"] for m in messages}
    if not {"user", "assistant"} <= spoken:
        raise _error(where, key, "needs at least one user turn and one assistant turn",
                     "Add the missing turn or delete the row")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] == "assistant":
        raise _error(where, key, "starts with the assistant (before any user turn): the chat template would train "
                     "a reply to nothing", "Start the conversation with the user's turn or delete the row")
    has_system = any(m["role"] == "system" for m in messages)
    return ([] if has_system else _system(where, record)) + messages


def _system(where: str, record: dict) -> list[dict]:
    """A top-level `system` field (Alpaca, ShareGPT as LLaMA-Factory writes them) as the first turn."""
    if "system" not in record:
        return []
    text = _text(where, record, "system", allow_empty=True)
    return [{"role": "system", "content": text}] if text.strip() else []


def _history(where: str, record: dict) -> list[dict]:
    """Alpaca `history` ([[instruction, response], ...], MedicalGPT / LLaMA-Factory) as the earlier turns."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise _error(where, "history", f"expected a list of [instruction, response] pairs, got {type(history).__name__}",
                     "Write it as [[\"question\", \"answer\"], ...] or remove it")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise _error(where, f"history[{i}]", "expected a pair of two non-empty strings [instruction, response]",
                         "Fix the pair or remove it")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return turns


def load_sft(path, fmt: str = "auto", on_bad_row: str = "error", source: str | None = None):
    """SFT conversations (formats: messages, sharegpt, alpaca; auto-detected per file) -> (rows, LoadReport)."""
    _check_mode(on_bad_row)
    text, report = _read(path, source)
    records = list(_jsonl_records(path, text))
    fmt = _detect(records, SFT_FORMATS, fmt, "fmt")

    def convert(where, line):
        record = _parse_object(where, line)
        row = {"id": f"sft-{where.rsplit(':', 1)[1]}", "messages": _sft_messages(where, record, fmt)}
        report.note_ignored(record, READS.get(fmt, ()))
        return row

    return _collect(report, records, convert, on_bad_row, "SFT"), report


def load_preferences(path, fmt: str = "auto", on_bad_row: str = "error", source: str | None = None):
    """Preference pairs (formats: trl = prompt/chosen/rejected, medicalgpt = question/response_chosen/
    response_rejected; JSON Lines whatever the extension) -> (rows, LoadReport)."""
    _check_mode(on_bad_row)
    text, report = _read(path, source)
    records = list(_jsonl_records(path, text))
    fmt = _detect(records, PREF_FORMATS, fmt, "fmt") or "trl"
    prompt_key, chosen_key, rejected_key = PREF_FORMATS[fmt]

    def convert(where, line):
        record = _parse_object(where, line)
        row = {"id": f"pref-{where.rsplit(':', 1)[1]}", "prompt": _text(where, record, prompt_key),
               "chosen": _text(where, record, chosen_key), "rejected": _text(where, record, rejected_key)}
        if row["chosen"].strip() == row["rejected"].strip():
            raise _error(where, rejected_key, f"identical to '{chosen_key}'",
                         "A pair must prefer one answer; delete the row")
        report.note_ignored(record, (prompt_key, chosen_key, rejected_key))
        return row

    return _collect(report, records, convert, on_bad_row, "preference"), report


def load_kto(path, on_bad_row: str = "error", source: str | None = None):
    """KTO rows {prompt, completion, label: bool} from JSON Lines -> (rows, LoadReport)."""
    _check_mode(on_bad_row)
    text, report = _read(path, source)

    def convert(where, line):
        record = _parse_object(where, line)
        row = {"id": f"kto-{where.rsplit(':', 1)[1]}", "prompt": _text(where, record, "prompt"),
               "completion": _text(where, record, "completion")}
        if not isinstance(record.get("label"), bool):
            problem = "missing" if "label" not in record else f"expected true or false, got {record['label']!r}"
            raise _error(where, "label", problem, "Set label to JSON true (desirable) or false (undesirable)")
        report.note_ignored(record, ("prompt", "completion", "label"))
        return {**row, "label": record["label"]}

    return _collect(report, _jsonl_records(path, text), convert, on_bad_row, "KTO"), report


def unpair(pairs: list[dict]) -> list[dict]:
    """Preference pairs -> KTO rows: the chosen answer desirable, the rejected one undesirable."""
    rows = []
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"id": f"{pair['id']}-{side}", "prompt": pair["prompt"], "completion": pair[side], "label": label})
    return rows


# ---- sampling and overlap -----------------------------------------------------------------

def sample_rows(rows: list, n: int | None, seed: int) -> list:
    """n rows chosen by seed, kept in their original order; n None or >= len(rows) -> all rows."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0 (or None for all rows).")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def split_heldout(rows: list, n_heldout: int, seed: int) -> tuple[list, list]:
    """(train, heldout): n_heldout rows chosen by seed, both in original order and disjoint."""
    if not 0 <= n_heldout < len(rows):
        raise ValueError(f"n_heldout={n_heldout} must be between 0 and {len(rows) - 1} for {len(rows)} rows.")
    held = set(random.Random(seed).sample(range(len(rows)), n_heldout))
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def _normalise(text: str) -> str:
    return " ".join(text.split())


def prompt_overlap(train_texts: list[str], eval_texts: list[str]) -> dict:
    """Exact matches after whitespace normalisation: how many eval texts also occur in the training texts."""
    train = {_normalise(t) for t in train_texts}
    hits = [t for t in eval_texts if _normalise(t) in train]
    return {"n_train": len(train_texts), "n_eval": len(eval_texts), "n_overlap": len(hits),
            "examples": [_normalise(t)[:200] for t in hits[:5]]}


# --- what a stage declares it reads ----------------------------------------------------------------------
def files(*keys: str):
    """A stage's `inputs`: the data files named by these data.* keys (unset keys are left out)."""
    def inputs(cfg) -> list[Path]:
        return [cfg.data_path(getattr(cfg.data, k)) for k in keys if getattr(cfg.data, k)]
    return inputs

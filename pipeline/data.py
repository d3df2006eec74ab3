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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

ON_BAD_ROW = ("error", "skip")
SFT_FORMATS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
PREF_FORMATS = {"trl": ("prompt", "chosen", "rejected"),
                "medicalgpt": ("question", "response_chosen", "response_rejected")}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
LETTERS = ("A", "B", "C", "D")
CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
PUBMEDQA_LABELS = ["yes", "no", "maybe"]
MAX_LOGGED_SKIPS = 20


class DataError(ValueError):
    """A data file the pipeline cannot use; the message says where, which field and what to do."""


@dataclass
class LoadReport:
    path: str
    sha256: str
    n_rows: int = 0
    n_skipped: int = 0
    skipped: list[dict] = field(default_factory=list)  # [{"where": "file:line", "reason": str}]

    def to_dict(self) -> dict:
        return asdict(self)


def _error(where: str, field_name: str, problem: str, fix: str) -> DataError:
    return DataError(f"{where}: field '{field_name}': {problem}. {fix}.")


# ---- reading files ------------------------------------------------------------------------

def _read(path, source: str | None) -> tuple[str, LoadReport]:
    """Return the file's text and a report holding the sha256 of exactly those bytes."""
    path = Path(path)
    if not path.is_file():
        hint = f" (it is set by {source})" if source else ""
        raise DataError(f"{path}: file not found{hint}. Check the path, or restore the bundled file under data/.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _error(f"{path}:{line}", "(encoding)", f"byte {e.start} is not UTF-8",
                     "Re-save the file as UTF-8") from None
    return text, LoadReport(path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def _jsonl_records(path, text: str) -> Iterable[tuple[str, str]]:
    """(where, line text) for each non-blank line; blank lines are ignored."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield f"{path}:{number}", line


def _parse_object(where: str, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _error(where, "(whole line)", f"not valid JSON ({e.msg} at column {e.colno})",
                     "Fix the line; the file must be JSON Lines, one object per line") from None
    if not isinstance(record, dict):
        raise _error(where, "(whole line)", f"a JSON {type(record).__name__}, not an object",
                     "Write one JSON object per line (JSON Lines), not an array")
    return record


def _text(where: str, record: dict, name: str, label: str | None = None, allow_empty=False) -> str:
    """record[name] as a non-empty string; `label` is how the field is named in the message."""
    label = label or name
    if name not in record:
        raise _error(where, label, "missing", f"Add '{label}' to this row")
    value = record[name]
    if not isinstance(value, str):
        raise _error(where, label, f"expected a string, got {type(value).__name__}", "Store it as a JSON string")
    if not allow_empty and not value.strip():
        raise _error(where, label, "empty text", "Fill it in or delete the row")
    return value


def _collect(report: LoadReport, records: Iterable[tuple[str, object]],
             convert: Callable[[str, object], dict], on_bad_row: str, what: str) -> list[dict]:
    """Convert each (where, record); skip or raise on DataError; refuse an empty result and duplicate ids."""
    rows, seen = [], {}
    for where, record in records:
        try:
            row = convert(where, record)
            if row["id"] in seen:
                raise _error(where, "id", f"duplicate id {row['id']!r} (first at {seen[row['id']]})",
                             "Remove the duplicate row")
        except DataError as e:
            if on_bad_row == "error":
                raise
            report.skipped.append({"where": where, "reason": str(e)})
            continue
        seen[row["id"]] = where
        rows.append(row)
    report.n_rows, report.n_skipped = len(rows), len(report.skipped)
    for item in report.skipped[:MAX_LOGGED_SKIPS]:
        log.warning("skipped %s", item["reason"])
    if report.n_skipped > MAX_LOGGED_SKIPS:
        log.warning("... and %d more skipped rows in %s", report.n_skipped - MAX_LOGGED_SKIPS, report.path)
    if not rows:
        why = (f"all {report.n_skipped} rows were skipped, the first because: {report.skipped[0]['reason']}"
               if report.skipped else "the file has no rows")
        raise DataError(f"{report.path}: empty {what} dataset: {why}. Point the config at a file with usable rows.")
    return rows


def _check_mode(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not accepted; use one of {', '.join(ON_BAD_ROW)}.")


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
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(where, record, "output")}]

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
    return messages


def load_sft(path, fmt: str = "auto", on_bad_row: str = "error", source: str | None = None):
    """SFT conversations (formats: messages, sharegpt, alpaca; auto-detected per file) -> (rows, LoadReport)."""
    _check_mode(on_bad_row)
    text, report = _read(path, source)
    records = list(_jsonl_records(path, text))
    fmt = _detect(records, SFT_FORMATS, fmt, "fmt")

    def convert(where, line):
        record = _parse_object(where, line)
        return {"id": f"sft-{where.rsplit(':', 1)[1]}", "messages": _sft_messages(where, record, fmt)}

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
        return {**row, "label": record["label"]}

    return _collect(report, _jsonl_records(path, text), convert, on_bad_row, "KTO"), report


def unpair(pairs: list[dict]) -> list[dict]:
    """Preference pairs -> KTO rows: the chosen answer desirable, the rejected one undesirable."""
    rows = []
    for pair in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append({"id": f"{pair['id']}-{side}", "prompt": pair["prompt"], "completion": pair[side], "label": label})
    return rows


# ---- evaluation sets ----------------------------------------------------------------------

def _options(where: str, record: dict) -> dict:
    options = record.get("options")
    if not isinstance(options, dict) or sorted(options) != list(LETTERS):
        raise _error(where, "options", f"expected an object with keys A, B, C, D, got {options!r:.80}",
                     "Give exactly four options keyed A-D")
    return {letter: _text(where, options, letter, f"options.{letter}") for letter in LETTERS}


def load_medqa(path, on_bad_row: str = "error", source: str | None = None):
    """MedQA-USMLE 4-option JSON Lines -> (rows, LoadReport)."""
    _check_mode(on_bad_row)
    text, report = _read(path, source)

    def convert(where, line):
        record = _parse_object(where, line)
        if not isinstance(record.get("realidx"), int) or isinstance(record.get("realidx"), bool):
            raise _error(where, "realidx", f"expected an integer, got {record.get('realidx')!r}",
                         "Give each row its integer index")
        question, options = _text(where, record, "question"), _options(where, record)
        answer = _text(where, record, "answer_idx")
        if answer not in options:
            raise _error(where, "answer_idx", f"{answer!r} is not one of the options A-D", "Set it to the gold letter")
        if "answer" in record and record["answer"] != options[answer]:
            raise _error(where, "answer", f"does not match options.{answer}", "Make answer_idx and answer agree")
        return {"id": f"medqa/{record['realidx']}", "set": "medqa", "subject": _text(where, record, "meta_info"),
                "question": question, "options": options, "answer": answer, "lang": "en"}

    return _collect(report, _jsonl_records(path, text), convert, on_bad_row, "MedQA"), report


def _cmmlu_file(path, on_bad_row: str, source: str | None):
    text, report = _read(path, source)
    subject = Path(path).stem
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header != CMMLU_HEADER:
        raise _error(f"{path}:1", "(header)", f"expected {','.join(CMMLU_HEADER)!r}, got {','.join(header or [])!r}",
                     "Use CMMLU's CSV layout")

    def records():
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield f"{path}:{reader.line_num}", row
        except csv.Error as e:
            raise _error(f"{path}:{reader.line_num}", "(row)", f"unreadable CSV ({e})",
                         "Fix the quoting on this line") from None

    def convert(where, row):
        if len(row) != len(CMMLU_HEADER):
            raise _error(where, "(row)", f"{len(row)} columns instead of {len(CMMLU_HEADER)}",
                         "Quote cells that contain commas")
        record = dict(zip(CMMLU_HEADER, row))
        if not record[""].strip().isdigit():
            raise _error(where, "(index)", f"row index {record['']!r} is not an integer", "Restore the first column")
        options = {letter: _text(where, record, letter) for letter in LETTERS}
        answer = record["Answer"].strip()
        if answer not in options:
            raise _error(where, "Answer", f"{answer!r} is not one of the options A-D", "Set it to the gold letter")
        return {"id": f"cmmlu/{subject}/{int(record[''])}", "set": "cmmlu", "subject": subject,
                "question": _text(where, record, "Question"), "options": options, "answer": answer, "lang": "zh"}

    return _collect(report, records(), convert, on_bad_row, "CMMLU"), report


def load_cmmlu(paths, on_bad_row: str = "error", source: str | None = None):
    """CMMLU CSV files (a list of files, or a folder of *.csv) -> (rows, [LoadReport per file])."""
    _check_mode(on_bad_row)
    if isinstance(paths, (str, Path)):
        folder = Path(paths)
        paths = sorted(folder.glob("*.csv")) if folder.is_dir() else [folder]
        if not paths:
            raise DataError(f"{folder}: no *.csv files in this folder. "
                            f"Point {source or 'the CMMLU path'} at the CMMLU CSVs.")
    rows, reports = [], []
    for path in paths:
        file_rows, report = _cmmlu_file(path, on_bad_row, source)
        rows += file_rows
        reports.append(report)
    return rows, reports


def _json_object(path, source: str | None) -> tuple[dict, LoadReport]:
    text, report = _read(path, source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(f"{path}:{e.lineno}", "(whole file)", f"not valid JSON ({e.msg} at column {e.colno})",
                     "Fix the file or restore the bundled copy") from None
    if not isinstance(data, dict):
        raise _error(f"{path}:1", "(whole file)", f"a JSON {type(data).__name__}, not an object keyed by PMID",
                     "Use PubMedQA's layout")
    return data, report


def load_pubmedqa(ori_path, test_ids_path, on_bad_row: str = "error", source: str | None = None):
    """PubMedQA-L restricted to the official test PMIDs -> (rows, [ori report, test-ids report])."""
    _check_mode(on_bad_row)
    ori, ori_report = _json_object(ori_path, source)
    truth, truth_report = _json_object(test_ids_path, source)
    ori_name = Path(ori_path).name

    def convert(where, item):
        pmid, label = item
        if label not in PUBMEDQA_LABELS:
            raise _error(where, "label", f"{label!r} is not yes, no or maybe", "Fix the gold label")
        if pmid not in ori:
            raise _error(where, "PMID", f"not found in {ori_name}",
                         "Use the ori_pqal.json that goes with this test split")
        record, ori_where = ori[pmid], f"{ori_path}:PMID {pmid}"
        if not isinstance(record, dict):
            raise _error(ori_where, "(entry)", f"a JSON {type(record).__name__}, not an object", "Restore the entry")
        question = _text(ori_where, record, "QUESTION")
        contexts = record.get("CONTEXTS")
        if not (isinstance(contexts, list) and contexts and all(isinstance(c, str) and c.strip() for c in contexts)):
            raise _error(ori_where, "CONTEXTS", "expected a non-empty list of non-empty strings",
                         "Restore the abstract")
        if record.get("final_decision", label) != label:
            raise _error(ori_where, "final_decision",
                         f"{record['final_decision']!r} disagrees with the test label {label!r}",
                         "Use matching copies of ori_pqal.json and test_ground_truth.json")
        return {"id": f"pubmedqa/{pmid}", "set": "pubmedqa", "subject": "reasoning_required",
                "question": question + "\n\n" + "\n".join(contexts), "options": list(PUBMEDQA_LABELS),
                "answer": label, "lang": "en"}

    records = ((f"{test_ids_path}:PMID {pmid}", (pmid, label)) for pmid, label in truth.items())
    rows = _collect(truth_report, records, convert, on_bad_row, "PubMedQA")
    ori_report.n_rows = len(rows)
    return rows, [ori_report, truth_report]


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

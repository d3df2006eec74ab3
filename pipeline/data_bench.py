"""The evaluation-set loaders: MedQA-USMLE (JSON Lines), CMMLU's medical subjects (CSV) and PubMedQA (JSON
plus its test ids), each -> ``(rows, LoadReport or [LoadReport, ...])`` in the evaluation form of pipeline.data
(which re-exports them): {"id", "set", "subject", "question", "options", "answer", "lang"}.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pipeline.data_read import (
    DataError, LoadReport, _check_mode, _collect, _error, _jsonl_records, _parse_object, _read, _text)

LETTERS = ("A", "B", "C", "D")
CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
PUBMEDQA_LABELS = ["yes", "no", "maybe"]


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

"""The reading layer every data loader shares (pipeline.data, pipeline.data_bench): a file read once and
hashed exactly as parsed (LoadReport), JSON Lines records, required text fields, and the collect loop that
either raises DataError naming ``file:line``, the field and the fix, or (``on_bad_row="skip"``) skips, counts
and logs the row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("pipeline.data")   # the loaders' logger: skipped rows are logged under pipeline.data

ON_BAD_ROW = ("error", "skip")
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
    ignored_fields: dict = field(default_factory=dict)  # {field no loader reads: rows that carry it}, never silent

    def note_ignored(self, record: dict, read) -> None:
        for key in record:
            if key not in read:
                self.ignored_fields[key] = self.ignored_fields.get(key, 0) + 1

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
    def unique(pairs):   # a JSON reader keeps the last of two equal keys: the first value would vanish unseen
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _error(where, key, "given twice in one object (a JSON reader silently keeps only the last)",
                             "Keep one value for it")
            seen.add(key)
        return dict(pairs)
    try:
        record = json.loads(line, object_pairs_hook=unique)
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

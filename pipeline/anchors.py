"""Published anchors (configs/references.yaml), each with the protocol it was measured under.

  load_references()      the entries, validated; a bad one is one line naming file:line and the field
  sota_lines(doc, refs)  reports/sota_compare.md: a published figure beside ours only under the same protocol, set,
                         split and shots, and a sentence where none matches
  base_check(doc, refs)  the base-model sanity check readiness runs: the base's accuracy under each protocol that has
                         a published figure for the same model must lie within its 95% CI widened by
                         readiness.anchor_tolerance_points
Light on purpose (yaml only): the gate imports it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.protocols import RESULTS as PROTOCOLS   # protocol -> eval evidence key (None: not run here)
from pipeline.protocols import TEXT as DESCRIBE

UNKNOWN = "unknown"          # a published protocol that is none of ours (or not known): listed, never compared
SHOTS = 0                    # every protocol of ours is zero-shot
CAUSES = ("the usual causes: the chat template (the model's own, applied), the EOS/end-of-turn token (generation "
          "stops where it should), the answer extraction (the methods in reports/eval/predictions/base.jsonl), "
          "truncation (max_new_tokens)")
REQUIRED = ("model", "set", "split", "n", "protocol", "shots", "source", "confirmed")
OPTIONAL = ("accuracy", "difference", "note", "protocol_note")
SOURCE_FIELDS = ("kind", "title", "table", "url")
SOURCE_KINDS = ("paper", "model_card")


class ReferenceError(ValueError):
    """configs/references.yaml is wrong; the message names file:line and the field."""


def _set_names() -> tuple[str, ...]:
    from pipeline import evalsets
    return evalsets.names()


def split_of(set_name: str) -> str | None:
    """The split our eval set is drawn from (its module's SPLIT)."""
    from pipeline import evalsets
    return getattr(evalsets.SETS.get(set_name), "SPLIT", None)


def _problem(e: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first problem of entry e, or None."""
    unknown = [k for k in e if k not in REQUIRED + OPTIONAL]
    if unknown:
        return unknown[0], f"is not a field (use {', '.join(REQUIRED + OPTIONAL)})"
    for k in REQUIRED:
        if e.get(k) in (None, ""):
            return k, "is missing: every figure states model, set, split, n, protocol, shots, source, confirmed"
    protocol = e["protocol"]
    if protocol not in (*PROTOCOLS, UNKNOWN):
        return "protocol", (f"{protocol!r} is not one of {', '.join(PROTOCOLS)} (or {UNKNOWN}: listed for context, "
                            "never compared)")
    if protocol == UNKNOWN and not e.get("protocol_note"):
        return "protocol_note", f"is missing: say why the protocol is {UNKNOWN}"
    if e["set"] not in _set_names():
        return "set", f"{e['set']!r} is not one of our eval sets ({', '.join(_set_names())})"
    for k, lo in (("n", 1), ("shots", 0)):
        if e[k] != UNKNOWN and (type(e[k]) is not int or e[k] < lo):
            return k, f"{e[k]!r} is not a whole number >= {lo} (or {UNKNOWN})"
    src = e["source"]
    if not isinstance(src, dict):
        return "source", f"is not a mapping of {', '.join(SOURCE_FIELDS)}"
    for k in SOURCE_FIELDS:
        if not src.get(k):
            return f"source.{k}", "is missing: no source, no number"
    if src["kind"] not in SOURCE_KINDS:
        return "source.kind", f"{src['kind']!r} is not one of {', '.join(SOURCE_KINDS)}"
    if not isinstance(e["confirmed"], bool):
        return "confirmed", f"{e['confirmed']!r} is not true or false"
    if not e["confirmed"] and not e.get("note"):
        return "note", "is missing: an unconfirmed figure says where it was quoted from"
    figures = [k for k in ("accuracy", "difference") if k in e]
    if len(figures) != 1:
        return "accuracy", "give exactly one of accuracy (percent) or difference ({low, high, between})"
    if "accuracy" in e and not (isinstance(e["accuracy"], (int, float)) and not isinstance(e["accuracy"], bool)
                                and 0 <= e["accuracy"] <= 100):
        return "accuracy", f"{e['accuracy']!r} is not a percent accuracy in [0, 100]"
    d = e.get("difference")
    bounds = isinstance(d, dict) and all(isinstance(d.get(k), (int, float)) for k in ("low", "high"))
    if "difference" in e and not (bounds and d["low"] <= d["high"] and d.get("between")):
        return "difference", "give {low, high} in points (low <= high) and between (what minus what)"
    return None


def load_references(path: str | Path | None = None) -> list[dict]:
    """The entries under `references:`; the first bad one raises ReferenceError('file:line: references[i] (model)
    field 'f' ...: what to do')."""
    from pipeline import reporting
    path = Path(path or reporting.REFERENCES)
    text = path.read_text(encoding="utf-8")
    try:
        root, data = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ReferenceError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML "
                             f"({getattr(exc, 'problem', exc)}): fix the syntax") from None
    entries = data.get("references") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ReferenceError(f"{path}:1: expected a mapping with a list under 'references:'")
    seq = next(v for k, v in root.value if k.value == "references")
    for i, (e, node) in enumerate(zip(entries, seq.value)):
        where = f"{path}:{node.start_mark.line + 1}: references[{i}]"
        if not isinstance(e, dict):
            raise ReferenceError(f"{where} is not a mapping: give {', '.join(REQUIRED)}")
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
        bad = _problem(e)
        if bad:
            field, why = bad
            line = lines.get(field.split(".")[0], node.start_mark.line + 1)
            raise ReferenceError(f"{path}:{line}: references[{i}] ({e.get('model', '?')}) field '{field}' {why}; "
                                 "complete the entry or delete it")
    return entries


def model_key(name) -> str:
    """A model id without its owner or folder: 'Qwen/Qwen2.5-7B-Instruct' and '/data/Qwen2.5-7B-Instruct' are the
    same model; a display name's words after the id ('(GGUF ...)', 'stand-in for ...') are not part of it."""
    token = str(name or "").split(" ")[0].rstrip("/")
    return token.rsplit("/", 1)[-1].casefold()


def comparable(r: dict, set_name: str, protocol: str) -> bool:
    """A published accuracy that can stand beside ours: same set, split, protocol and shots."""
    return (r["protocol"] == protocol and r["set"] == set_name and r["split"] == split_of(set_name)
            and r["shots"] == SHOTS and "accuracy" in r)


def source_text(r: dict) -> str:
    s = r["source"]
    status = "confirmed in the source" if r["confirmed"] else f"NOT confirmed: {r['note']}"
    return f"{s['title']}, {s['table']} ({s['url']}; {status})"


def scored_protocols(doc: dict) -> dict[str, dict]:
    """{protocol: its results block} for every protocol of ours the eval evidence holds."""
    return {p: doc[k] for p, k in PROTOCOLS.items() if k and isinstance((doc or {}).get(k), dict) and doc[k]}


def _shots(r: dict) -> str:
    return f"{r['shots']}-shot" if isinstance(r["shots"], int) else "shots unknown"


def _pt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ours(res: dict) -> str:
    return f"{_pt(res.get('accuracy'))}% [{_pt(res.get('ci_low'))}, {_pt(res.get('ci_high'))}] (n={res.get('n')})"


def base_check(doc: dict, refs: list[dict], tolerance_points: float) -> tuple[list[str], list[dict]]:
    """(blockers, comparisons) of the base model against the published figures for the same model (model_key of the
    eval's model_name), one protocol at a time: a figure is within reach when it lies in the base's 95% CI widened
    by tolerance_points on each side. A protocol with a figure that this run did not score is a blocker too."""
    model, blockers, rows = (doc or {}).get("model_name"), [], []
    mine = [r for r in refs if r["protocol"] in PROTOCOLS and model_key(r["model"]) == model_key(model)]
    scored = scored_protocols(doc)
    for protocol, block in scored.items():
        for s, res in ((block.get("base") or {}).items()):
            figures = [r for r in mine if comparable(r, s, protocol)]
            if not figures:
                rows.append({"protocol": protocol, "set": s, "ours": res.get("accuracy"), "published": None,
                             "within": None, "text": f"no published figure for {model} under protocol {protocol} on "
                             f"{s} ({split_of(s)}, {SHOTS}-shot): not compared"})
            for r in figures:
                lo, hi = (res.get(k) if res.get(k) is not None else res.get("accuracy") for k in ("ci_low", "ci_high"))
                within = lo is not None and 100 * lo - tolerance_points <= r["accuracy"] <= 100 * hi + tolerance_points
                rows.append({"protocol": protocol, "set": s, "ours": res.get("accuracy"), "ci_low": lo, "ci_high": hi,
                             "n": res.get("n"), "published": r["accuracy"], "source": source_text(r),
                             "tolerance_points": tolerance_points, "within": within,
                             "text": f"base {model} on {s} under {protocol}: ours {_ours(res)}, published "
                                     f"{r['accuracy']}% ({source_text(r)})"})
                if not within:
                    blockers.append(f"the base model {model} scores {_ours(res)} on {s} under protocol {protocol}, "
                                    f"published {r['accuracy']}% by {source_text(r)}: outside our 95% CI widened by "
                                    f"readiness.anchor_tolerance_points {tolerance_points:g}; check {CAUSES}")
    for r in mine:
        measured = (scored.get(r["protocol"]) or {}).get("base") or {}
        if r["set"] in measured or "accuracy" not in r or r["shots"] != SHOTS or r["split"] != split_of(r["set"]):
            continue
        key = PROTOCOLS[r["protocol"]]
        rows.append({"protocol": r["protocol"], "set": r["set"], "ours": None, "published": r["accuracy"],
                     "source": source_text(r), "within": None,
                     "text": f"published {r['accuracy']}% for {model} on {r['set']} under {r['protocol']} "
                             f"({source_text(r)}); this run did not score the base there"})
        if key:
            fix = (f"set eval.free_answer=true with {r['set']} in eval.free_answer_sets"
                   if r["protocol"] == "free_answer_extraction" else f"score it (eval evidence key {key})")
            blockers.append(f"the base model {model} has a published figure on {r['set']} under protocol "
                            f"{r['protocol']} ({r['accuracy']}%, {source_text(r)}) but this run did not score the "
                            f"base there, so the sanity check cannot run: {fix}")
    return blockers, rows


def sota_lines(doc: dict, refs: list[dict], tolerance_points: float) -> list[str]:
    """The published-figures sections of reports/sota_compare.md."""
    from pipeline.reporting import acc_cell, md_table
    lines = ["## 2. Published figures under the same protocol", "",
             f"A published figure stands beside ours only when it was measured under the same protocol, on the same "
             f"set and split, with the same number of shots (ours: {SHOTS}). Figures from `configs/references.yaml`; "
             "'NOT confirmed' means the figure was not checked against its source here.", ""]
    scored, shown = scored_protocols(doc), []
    for protocol, block in scored.items():
        lines += [f"### Protocol `{protocol}` ({DESCRIBE[protocol]})", ""]
        for s in (doc.get("sets") or {}):
            ours = [[f"this run: {v}", acc_cell(res.get(s)), "-", "-"] for v, res in block.items() if res.get(s)]
            if not ours:
                continue
            figures = [r for r in refs if comparable(r, s, protocol)]
            shown += figures
            pub = [[r["model"], f"{r['accuracy']}% (n={r['n']})", _shots(r), source_text(r)] for r in figures]
            lines += [f"**{s}** ({split_of(s)}):", "",
                      md_table(["model", "accuracy", "shots", "source"], ours + pub), ""]
            if not pub:
                lines += [f"No published figure under protocol `{protocol}` for set {s} ({split_of(s)}, "
                          f"{SHOTS}-shot).", ""]
        lines += [f"(Ours: `{PROTOCOLS[protocol]}.<variant>.<set>` in `reports/eval/eval_default.json`.)", ""]
    rest = [r for r in refs if not any(r is f for f in shown)]
    rows = [[r["model"], r["set"], r["split"],
             r["protocol"] + (f" ({r['protocol_note']})" if r.get("protocol_note") else ""), _shots(r),
             f"{r['accuracy']}%" if "accuracy" in r else
             f"{r['difference']['low']:+g} to {r['difference']['high']:+g} points ({r['difference']['between']})",
             source_text(r)] for r in rest]
    lines += ["## 3. Published figures not compared with this run", "",
              "Measured under a protocol (or on a set) this run did not score, under one that is not ours, with other "
              "shots or on another split: context only, never a like-for-like comparison.", ""]
    lines += [md_table(["model", "set", "split", "protocol", "shots", "figure", "source"], rows) if rows
              else "None.", ""]
    checks = base_check(doc, refs, tolerance_points)[1]
    lines += ["## 4. The base model against published figures for the same model", "",
              f"Within reach: the published figure lies in our 95% CI widened by {tolerance_points:g} points "
              "(readiness.anchor_tolerance_points). Readiness repeats this check.", ""]
    return lines + ([verdict_line(c) for c in checks] or ["- No scored base model."]) + [""]


def verdict_line(c: dict) -> str:
    """One comparison of base_check as a Markdown bullet."""
    word = {True: "within reach", False: "OUT OF REACH", None: "not compared"}[c["within"]]
    return f"- {word}: {c['text']}"

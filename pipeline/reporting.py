"""Small helpers the eval, judge and reports stages share: number formatting, markdown tables, the
published-references loader (no citation, no number) and the accuracy figure."""
from __future__ import annotations

from pathlib import Path

import yaml

EVAL_JSON = "reports/eval/eval_default.json"
JUDGE_JSON = "reports/judge/judge_summary.json"
REFERENCES = Path(__file__).resolve().parents[1] / "configs" / "references.yaml"
CITATION_FIELDS = ("paper", "table", "setting", "benchmark", "number")


def pct(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def acc_cell(res: dict | None) -> str:
    """'41.7% [25.0, 58.3] (n=24)' from an evalkit.accuracy_ci result."""
    if not res or res.get("accuracy") is None:
        return "n/a"
    lo, hi = res.get("ci_low"), res.get("ci_high")
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    return f"{pct(res['accuracy'])}{ci} (n={res['n']})"


def md_table(headers: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def scored(eval_doc: dict | None) -> list[str]:
    variants = (eval_doc or {}).get("variants") or {}
    return [v for v, e in variants.items() if e.get("status") == "scored"]


def load_references(path: str | Path = REFERENCES) -> list[dict]:
    """Published figures from a YAML list under `references:`; an entry without paper, table, setting,
    benchmark, number and a url or doi is an error naming the file, the entry and the missing field."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    entries = data.get("references") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a mapping with a list under 'references:'")
    for i, e in enumerate(entries):
        where = f"{path}: references[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where} is not a mapping: give paper, table, setting, benchmark, number, url or doi")
        missing = [k for k in CITATION_FIELDS if e.get(k) in (None, "")]
        if not (e.get("url") or e.get("doi")):
            missing.append("url or doi")
        if missing:
            raise ValueError(f"{where} ({e.get('model', '?')}) lacks {', '.join(missing)}: "
                             "no citation, no number; complete the entry or delete it")
        if not isinstance(e["number"], (int, float)):
            raise ValueError(f"{where}: number {e['number']!r} is not a number (percent accuracy)")
    return entries


def plot_accuracy(results: dict, sets: list[str], path: Path) -> str | None:
    """Grouped bars: accuracy per variant per set with the bootstrap CI as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = [v for v in results if results[v]]
    if not variants or not sets:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) + 2), 3.6))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        accs, errs = [], [[], []]
        for s in sets:
            r = results[v].get(s) or {}
            a = r.get("accuracy") or 0.0
            accs.append(a)
            errs[0].append(max(0.0, a - (r.get("ci_low") if r.get("ci_low") is not None else a)))
            errs[1].append(max(0.0, (r.get("ci_high") if r.get("ci_high") is not None else a) - a))
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(sets))]
        ax.bar(xs, accs, width, yerr=errs, capsize=3, label=v)
    ax.set_xticks(range(len(sets)), sets), ax.set_ylim(0, 1), ax.set_ylabel("accuracy (95% bootstrap CI)")
    ax.legend(fontsize=7, ncol=len(variants)), ax.grid(axis="y", alpha=0.3)
    ax.set_title("accuracy per variant (source: reports/eval/eval_default.json)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    return str(path)


# --- reports/eval_default.md ------------------------------------------------------------------------
def results_table(doc: dict) -> str:
    sets = list(doc.get("sets") or {})
    rows = [[v] + [acc_cell((doc["results"].get(v) or {}).get(s)) for s in sets] for v in scored(doc)]
    return md_table(["variant"] + [f"{s} accuracy [95% CI]" for s in sets], rows)


def paired_table(doc: dict) -> str:
    rows = [[f"{p['a']} vs {p['b']}", p["set"], pct(p["accuracy_a"]), pct(p["accuracy_b"]),
             f"{100 * p['difference']:+.1f} pt" if p.get("difference") is not None else "n/a",
             f"{p['a_only']} / {p['b_only']}", f"{p['p_value']:.3g}"] for p in doc.get("paired") or []]
    return md_table(["comparison", "set", "acc a", "acc b", "a - b", "discordant a-only / b-only", "McNemar exact p"], rows)


def skipped_lines(doc: dict) -> list[str]:
    return [f"- **{v}**: skipped, not scored: {e.get('reason')}" for v, e in (doc.get("variants") or {}).items()
            if e.get("status") != "scored"]


def eval_markdown(doc: dict, cfg, commit: str | None) -> str:
    src = f"Source of every number below: `{EVAL_JSON}`."
    sets = doc["sets"]
    setup = [["model", doc["model_name"]], ["tier", cfg.tier], ["git commit", commit or "unknown"],
             ["sets (sample / full size)", ", ".join(f"{s} {i['planned_n']}/{i['full_size']}" for s, i in sets.items())],
             ["sample seed", cfg.eval.seed], ["bootstrap", f"{doc['n_bootstrap']} percentile resamples, seed {cfg.eval.seed}"],
             ["generation", f"greedy, HF generate, batch size {doc['batch_size']} (left padding), "
                            f"max_new_tokens {doc['max_new_tokens']}"],
             ["LLM extraction fallback", "used" if doc["fallback"]["available"] else f"not used: {doc['fallback']['reason']}"]]
    fails = [[v] + [f"{pct((doc['results'][v].get(s) or {}).get('format_failure_rate'))} "
                    f"({(doc['results'][v].get(s) or {}).get('format_failures')})" for s in sets] for v in scored(doc)]
    lines = [f"# Evaluation: {cfg.tier} tier", "", src, "", "## Setup", "", md_table(["item", "value"], setup), "",
             "## Accuracy", "", results_table(doc), "", f"(Source: `{EVAL_JSON}`, fields `results.<variant>.<set>`.)", ""]
    if cfg.tier in ("tiny", "demo"):
        lines += [f"Tier {cfg.tier} is a smoke test on small samples: these numbers check the pipeline, not the method.", ""]
    lines += ["## Format failures (no answer extracted; counted as wrong)", "",
              md_table(["variant"] + list(sets), fails), "", f"(Source: `{EVAL_JSON}`, `results.<variant>.<set>.format_failures`.)", "",
              "## Paired comparisons (same question ids)", "", paired_table(doc), "",
              f"(Source: `{EVAL_JSON}`, field `paired`; no correction for multiple comparisons.)", ""]
    if skipped_lines(doc):
        lines += ["## Variants not scored", ""] + skipped_lines(doc) + [""]
    return "\n".join(lines)

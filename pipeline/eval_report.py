"""reports/eval_default.md: the eval stage's report, both scoring protocols side by side. Every number is read from
the eval evidence (reports/eval/eval_default.json) and says so."""
from __future__ import annotations

from pipeline.reporting import (EVAL_JSON, PROTOCOL_TEXT, acc_cell, answers_table, degenerate_lines, md_table, paired_table,
                                pct, protocol_fields, scored, skipped_lines, statistics_lines)


def protocols_table(doc: dict) -> str:
    """Both protocols side by side: per variant, each set's accuracy [95% CI] under each protocol."""
    sets, fields = list(doc.get("sets") or {}), protocol_fields(doc)
    rows = [[v] + [acc_cell(((doc.get(f) or {}).get(v) or {}).get(s)) for s in sets for f in fields] for v in scored(doc)]
    return md_table(["variant"] + [f"{s}, `{fields[f]}`" for s in sets for f in fields], rows)


def protocol_lines(doc: dict) -> list[str]:
    lines = [f"- `{name}` (`{field}.<variant>.<set>`): {PROTOCOL_TEXT.get(name, name)}."
             for field, name in protocol_fields(doc).items()]
    if "results_loglik" in doc:
        lines.append("- `loglik` acc_norm (per-character normalised) is in `results_loglik.<variant>.<set>.acc_norm` "
                     "where lm-eval reports it (medqa_4options, cmmlu); with one-letter options it equals acc. "
                     "lm-eval's own per-task figures: `results_loglik.<variant>.<set>.harness`.")
    return lines


def eval_markdown(doc: dict, cfg, commit: str | None) -> str:
    src = f"Source of every number below: `{EVAL_JSON}`."
    sets = doc["sets"]
    setup = [["model", doc["model_name"]], ["tier", cfg.tier], ["git commit", commit or "unknown"],
             ["sets (sample / full size)", ", ".join(f"{s} {i['planned_n']}/{i['full_size']}" for s, i in sets.items())],
             ["sample seed", cfg.eval.seed], ["bootstrap", f"{doc['n_bootstrap']} percentile resamples, seed {cfg.eval.seed}"],
             ["generation", f"greedy, HF generate, batch size {doc['batch_size']} (left padding), "
                            f"max_new_tokens {doc['max_new_tokens']}"],
             ["decoding", ", ".join(f"{k} {v}" for k, v in doc["generation"]["decoding"].items())
              + " (set explicitly: the model's generation_config.json is not used)"],
             ["models in memory", f"base loaded {doc['memory']['base_loads']}x, at most "
                                  f"{doc['memory']['max_live_models']} alive (adapters switched on it)"],
             ["LLM extraction fallback", "used" if doc["fallback"]["available"] else f"not used: {doc['fallback']['reason']}"]]
    if ll := doc.get("loglik"):
        copies = ", ".join(f"{k} = lm-eval {t.get('replicates')}" for k, t in ll["tasks"].items())
        setup.append(["loglik protocol", f"lm_eval {ll['lm_eval']} (`{ll['tasks_dir']}`: {copies}), "
                      f"{ll['num_fewshot']}-shot, chat template {'on' if ll['chat_template'] else 'off'}, "
                      f"{sum(ll['seconds'].values()):.1f} s for {len(ll['seconds'])} variants"])
    fails = [[v] + [f"{pct((doc['results'][v].get(s) or {}).get('format_failure_rate'))} "
                    f"({(doc['results'][v].get(s) or {}).get('format_failures')})" for s in sets] for v in scored(doc)]
    lines = [f"# Evaluation: {cfg.tier} tier", "", src, "", "## Setup", "", md_table(["item", "value"], setup), "",
             "## Accuracy under both protocols (same question ids)", "", *protocol_lines(doc), "", protocols_table(doc), "",
             f"(Source: `{EVAL_JSON}`, fields `results.<variant>.<set>` (generative_letter) and "
             "`results_loglik.<variant>.<set>` (loglik); per item: `reports/eval/predictions/<variant>.jsonl` and "
             "`reports/eval/predictions/loglik/<variant>.jsonl`.)", ""]
    if cfg.tier in ("tiny", "demo"):
        lines += [f"Tier {cfg.tier} is a smoke test on small samples: these numbers check the pipeline, not the method.", ""]
    lines += ["## Format failures (no answer extracted; counted as wrong)", "",
              md_table(["variant"] + list(sets), fails), "", f"(Source: `{EVAL_JSON}`, `results.<variant>.<set>.format_failures`.)", "",
              "## Answers against the gold (degenerate predictors)", "", answers_table(doc), "",
              *degenerate_lines(doc), "", f"(Source: `{EVAL_JSON}`, `results.<variant>.<set>.answers`.)", "",
              "## Paired comparisons (same question ids)", "", paired_table(doc), "", *statistics_lines(doc), "",
              f"(Source: `{EVAL_JSON}`, fields `paired` (p_holm, survives_holm, diff_ci) and "
              "`min_detectable_difference`.)", ""]
    if skipped_lines(doc):
        lines += ["## Variants not scored", ""] + skipped_lines(doc) + [""]
    return "\n".join(lines)

"""Small helpers the eval, judge and reports stages share: number formatting, markdown tables, where the published
references lie (pipeline/anchors.py loads and checks them) and the accuracy figure."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.protocols import TEXT as PROTOCOL_TEXT   # what each scoring protocol is (one table)

EVAL_JSON = "reports/eval/eval_default.json"
JUDGE_JSON = "reports/judge/judge_summary.json"
REFERENCES = Path(__file__).resolve().parents[1] / "configs" / "references.yaml"


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


def reference_files(cfg) -> list[Path]:
    """The reports stage's declared input: the published figures it quotes."""
    return [REFERENCES]


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
def protocol_fields(doc: dict) -> dict:
    """{evidence field: protocol name}; evidence from before the second protocol has `results` only."""
    return doc.get("protocols") or {"results": "generative_letter"}


def results_table(doc: dict, field: str = "results") -> str:
    sets = list(doc.get("sets") or {})
    rows = [[v] + [acc_cell(((doc.get(field) or {}).get(v) or {}).get(s)) for s in sets] for v in scored(doc)]
    return md_table(["variant"] + [f"{s} accuracy [95% CI]" for s in sets], rows)


def _pt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def reading(doc: dict, p: dict) -> str:
    """What a comparison lets a thesis say: a difference that survives Holm, or the bound of a null result."""
    if p.get("survives_holm"):
        return "a difference (survives Holm at 0.05)"
    bound = (((doc.get("min_detectable_difference") or {}).get("sets") or {}).get(p["set"]) or {}).get("difference")
    return f"no evidence of a difference larger than {_pt(bound)} points"


def paired_table(doc: dict) -> str:
    rows = []
    for p in doc.get("paired") or []:
        ci = p.get("diff_ci") or {}
        diff = f"{100 * p['difference']:+.1f} pt" if p.get("difference") is not None else "n/a"
        if ci.get("ci_low") is not None:
            diff += f" [{100 * ci['ci_low']:+.1f}, {100 * ci['ci_high']:+.1f}]"
        holm = f"{p['p_holm']:.3g}" if p.get("p_holm") is not None else "n/a"
        rows.append([f"{p['a']} vs {p['b']}", p.get("protocol", "-"), p["set"], pct(p["accuracy_a"]),
                     pct(p["accuracy_b"]), diff, f"{p['a_only']} / {p['b_only']}", f"{p['p_value']:.3g}", holm,
                     reading(doc, p)])
    return md_table(["comparison", "protocol", "set", "acc a", "acc b", "a - b [95% paired bootstrap CI]",
                     "discordant a-only / b-only", "McNemar exact p", "Holm p", "reading"], rows)


def statistics_lines(doc: dict) -> list[str]:
    """Which comparisons survive Holm's correction, and the minimum detectable difference per set (its formula)."""
    paired, mc = doc.get("paired") or [], doc.get("multiple_comparisons") or {}
    lines = []
    for protocol in dict.fromkeys(p.get("protocol") for p in paired):
        family = [p for p in paired if p.get("protocol") == protocol]
        kept = [f"{p['a']} vs {p['b']} on {p['set']}" for p in family if p.get("survives_holm")]
        lines.append(f"- Protocol `{protocol}`: {len(family)} paired tests, one Holm-Bonferroni family "
                     f"(alpha {mc.get('alpha', 0.05)}); {len(kept)} survive correction"
                     + (f": {', '.join(kept)}." if kept else "."))
    power = doc.get("min_detectable_difference") or {}
    per_set = ", ".join(f"{s} {_pt(e.get('difference'))} points (n={e.get('n')})"
                        for s, e in (power.get("sets") or {}).items())
    if per_set:
        lines.append(f"- Minimum detectable difference (two-sided alpha {power.get('alpha')}, power "
                     f"{power.get('power')}): {per_set}. Formula: {power.get('method')}. A comparison that does not "
                     "survive correction is no evidence of a difference larger than its set's figure.")
    return lines


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "-"


def answers_table(doc: dict) -> str:
    """Per variant and set: extracted answers against the gold answers, and the degenerate-predictor flag."""
    rows = []
    for v in scored(doc):
        for field, protocol in protocol_fields(doc).items():
            for s, res in ((doc.get(field) or {}).get(v) or {}).items():
                a = res.get("answers") or {}
                if not a:
                    continue
                top = f"{a['top_answer']} {pct(a['top_share'], 0)}" if a.get("top_answer") is not None else "-"
                rows.append([v, protocol, s, _counts(a["predicted"]), a["unanswered"], _counts(a["gold"]), top,
                             pct(a["gold_top_share"], 0), "**DEGENERATE**" if a["degenerate"] else "-"])
    return md_table(["variant", "protocol", "set", "answers (extracted / loglik argmax)", "unanswered", "gold answers",
                     "top answer (share)", "gold's top share", "degenerate predictor"], rows)


def degenerate_lines(doc: dict) -> list[str]:
    flagged = [(v, s, r["answers"]["threshold"]) for v in scored(doc) for s, r in (doc["results"].get(v) or {}).items()
               if (r.get("answers") or {}).get("degenerate")]
    lines = [f"Degenerate predictors (one answer above eval.degenerate_share of a set's questions while the gold's "
             f"largest share is below it), protocol `generative_letter`: "
             f"{', '.join(f'{v} on {s} (> {pct(t, 0)})' for v, s, t in flagged) or 'none'}. "
             "A flagged trained variant is not a result: thesis readiness lists it as a blocker."]
    ll = [f"{v} on {s}" for v in scored(doc) for s, r in ((doc.get("results_loglik") or {}).get(v) or {}).items()
          if (r.get("answers") or {}).get("degenerate")]
    if "results_loglik" in doc:
        lines.append(f"Under `loglik` (the option with the highest log-likelihood): {', '.join(ll) or 'none'}.")
    return lines


def skipped_lines(doc: dict) -> list[str]:
    return [f"- **{v}**: skipped, not scored: {e.get('reason')}" for v, e in (doc.get("variants") or {}).items()
            if e.get("status") != "scored"]


# --- reports/thesis_support/ ------------------------------------------------------------------------
def _train_docs(ctx) -> dict:
    return {k: (ctx.evidence(k), ctx.registry[k].evidence(ctx.cfg)) for k in ctx.registry.methods}


def thesis_draft(ctx, eval_doc: dict | None, judge_doc: dict | None) -> str:
    """Method, setup, results and limitations for the thesis; every number names its evidence file."""
    cfg, train = ctx.cfg, _train_docs(ctx)
    sft, sft_rel = train["sft"]
    ok = {k: (d, rel) for k, (d, rel) in train.items() if d and d.get("status") == "ok"}
    lines = [f"# Thesis draft material (tier {cfg.tier})", "",
             "Every number is followed by the evidence file it came from. Nothing here is typed by hand.", ""]
    if cfg.tier in ("tiny", "demo"):
        lines += [f"**Tier {cfg.tier} is a smoke test: its numbers check the pipeline and must not be reported as results.**", ""]
    lines += ["## Method", "", "### Data", ""]
    if sft and sft.get("status") == "ok":
        d = sft["data"]
        lines += [f"- SFT conversations: {d['train_rows']} trained [{sft_rel}: data.train_rows] from `{cfg.data.sft_path}`; "
                  f"{len(d['eval_ids'])} held out for eval loss and {len(d['judge_heldout_ids'])} for the LLM judge, by id "
                  f"[{sft_rel}: data.eval_ids, data.judge_heldout_ids]."]
    for k in ("dpo", "kto"):
        if k in ok:
            d, rel = ok[k]
            lines.append(f"- {k.upper()} rows: {d['data']['rows']} [{rel}: data.rows] from `{cfg.data.preference_path}`.")
    for s, info in ((eval_doc or {}).get("sets") or {}).items():
        lines.append(f"- Eval set {s}: {info['planned_n']} of {info['full_size']} questions, seed {info['seed']} [{EVAL_JSON}: sets.{s}].")
    lines += ["", "### Model and LoRA", ""]
    if sft and sft.get("status") == "ok":
        p, lo = sft["precision"], sft["lora"]
        lines += [f"- Base model: {sft['model_name']} [{sft_rel}: model_name]; {p['dtype']}, quantization {p['quantization']}, "
                  f"attention {p['attn_implementation']} on {p['device']} [{sft_rel}: precision].",
                  f"- LoRA r={lo['r']}, alpha={lo['alpha']}, dropout={lo['dropout']} on {', '.join(lo['target_modules'])} "
                  f"[{sft_rel}: lora]; chat template sha256 {sft['chat_template']['sha256'][:12]} [{sft_rel}: chat_template]."]
    else:
        lines.append(f"- SFT did not train ({(sft or {}).get('status', 'missing')}: {(sft or {}).get('reason')}).")
    rows = [[k, d.get("algorithm", {}).get("trainer", "SFTTrainer"), f"{d['global_step']}/{d['planned_max_steps']}",
             f"{d['final_batch_size']} x {d['final_grad_acc']}", getattr(cfg, k).learning_rate,
             d.get("algorithm", {}).get("beta", "-"), f"{d['loss_curve'][-1][1]:.4g}" if d.get("loss_curve") else "n/a",
             d["train_runtime_s"], d["peak_mem_gb"], rel] for k, (d, rel) in ok.items()]
    lines += ["", "### Training and alignment", "",
              "DPO, SimPO (TRL CPOTrainer, loss_type simpo, cpo_alpha 0) and KTO each continue training the SFT LoRA "
              "adapter against a frozen copy of it; each final is one LoRA adapter over the base model.", "",
              md_table(["stage", "trainer", "steps done/planned", "batch x grad acc", "learning rate (config)", "beta",
                        "final loss", "runtime s", "peak mem GB", "evidence"], rows) if rows else "No training stage is ok.",
              "", "(learning rate: resolved config in `reports/thesis_support/experiment_record.json`, field config.<stage>.)", ""]
    lines += ["## Results", ""]
    if scored(eval_doc):
        for field, protocol in protocol_fields(eval_doc).items():
            lines += [f"Protocol `{protocol}` ({PROTOCOL_TEXT.get(protocol, protocol)}):", "",
                      results_table(eval_doc, field), "", f"[{EVAL_JSON}: {field}]", ""]
        lines += [paired_table(eval_doc), "",
                  *statistics_lines(eval_doc), "", f"[{EVAL_JSON}: paired, min_detectable_difference]", ""]
    else:
        lines += [f"No measured results: eval {(eval_doc or {}).get('status', 'missing')} ({(eval_doc or {}).get('reason')}).", ""]
    lines += skipped_lines(eval_doc or {}) + [""]
    figures = sorted(p.relative_to(ctx.root).as_posix() for p in (ctx.root / "reports/figures").glob("*.png"))
    lines += ["## Figures", ""] + [f"- `{f}`" for f in figures + (["reports/figures/eval_accuracy.png"] if scored(eval_doc) and
                                                                  "reports/figures/eval_accuracy.png" not in figures else [])] + [""]
    lines += ["## Limitations", ""]
    if "dpo" in ok:
        lb, rel = ok["dpo"][0]["data"]["length_bias"], ok["dpo"][1]
        lines.append(f"- Preference data length bias: chosen answers average {lb['chosen_mean_chars']} characters, rejected "
                     f"{lb['rejected_mean_chars']} (ratio {lb['ratio']}, {lb['n_pairs']} pairs) [{rel}: data.length_bias]; "
                     "preference training may reward length rather than quality.")
    lines += ["- Accuracies carry 95% percentile-bootstrap intervals, differences paired-bootstrap intervals; paired "
              "McNemar p-values are Holm-Bonferroni adjusted within each protocol's family (`p_holm`), and a null "
              "result is bounded by the minimum detectable difference of its set, not read as equality.",
              "- Published figures in reports/sota_compare.md stand beside ours only under the same protocol, set, split "
              "and shots; each says whether it was confirmed in its source.",
              "- LLM judges are themselves models: position and length bias are reported (order inconsistency, "
              "length-controlled win rate), not removed."]
    judge_status = (judge_doc or {}).get("status", "missing")
    for key, attr, var in (("pairwise", "enabled", "ENABLE_LLM_JUDGE"), ("risk", "risk_enabled", "ENABLE_LLM_RISK_JUDGE")):
        entry = (judge_doc or {}).get(key) or {}
        if judge_status != "ok" or not entry.get("enabled"):
            lines.append(f"- {key} judge: not run (judge stage {judge_status}: {(judge_doc or {}).get('reason') or 'disabled'}; "
                         f"{var}={str(getattr(cfg.judge, attr)).lower()}) [{JUDGE_JSON}].")
    return "\n".join(lines) + "\n"


def experiment_record(ctx, judge_doc: dict | None) -> dict:
    """What reproduces this run: commit, command, config, non-secret env, versions, hardware, data hashes, stages."""
    import sys
    from importlib import metadata

    from pipeline import evalsets, judgekit, settings
    from pipeline import provenance
    from pipeline.evidence import portable, sha256_file
    cfg = ctx.cfg
    commit = provenance.git_commit() or ""
    env = settings.environment()
    names = [*settings.ENV_MAP, "BRANCH", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_ENDPOINT", "CUDA_VISIBLE_DEVICES"]
    env_rec = {k: env[k] for k in names if env.get(k) not in (None, "") and k not in settings.SECRET_VARS}
    env_rec = portable(env_rec, ctx.root)   # paths inside the root relative to it: the record moves with the root
    if "OPENAI_BASE_URL" in env_rec:
        env_rec["OPENAI_BASE_URL"] = judgekit.endpoint_host(env_rec["OPENAI_BASE_URL"])
    extra = {}
    for pkg in ("numpy", "scipy", "statsmodels", "matplotlib", "rich", "pyyaml", "python-dotenv", "tensorboard", "gguf"):
        try:
            extra[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            extra[pkg] = None
    paths = [cfg.data.sft_path, cfg.data.preference_path, cfg.data.kto_path]
    files = [cfg.data_path(p) for p in paths if p] + evalsets.files(cfg)
    check = ctx.evidence("gpu_check") or {}
    sft = ctx.evidence("sft") or {}
    config = portable(cfg.to_dict(), ctx.root)
    if config["judge"].get("base_url"):
        config["judge"]["base_url"] = judgekit.endpoint_host(config["judge"]["base_url"])
    stage_rec = {}
    for s in (ctx.registry[n] for n in ctx.registry.upstream(ctx.name)):   # what this report was made from
        doc = ctx.evidence(s.name) or {}
        stage_rec[s.name] = {"evidence": s.evidence(cfg), "status": doc.get("status", "missing"),
                             "fingerprint": doc.get("fingerprint"), "duration_s": doc.get("duration_s"),
                             "finished_at": doc.get("finished_at")}
    record = {
        "git": {"commit": commit.removesuffix("-dirty") or None, "dirty": commit.endswith("-dirty")},
        "command": sys.argv, "config": config, "env": env_rec, "versions": {**provenance.versions(), **extra},
        "hardware": {k: (check.get("probe") or {}).get(k) for k in ("cuda_available", "torch_version", "torch_cuda_build",
                                                                    "driver", "devices", "flash_attn", "bitsandbytes")},
        "precision_plan": check.get("plan"),
        "seeds": {"runtime": cfg.runtime.seed, "data": cfg.data.seed, "eval": cfg.eval.seed, "tiny_model": cfg.model.tiny_seed},
        "data_files": {str(p.relative_to(settings.REPO)) if p.is_relative_to(settings.REPO) else str(p):
                       {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files if p.is_file()},
        "chat_template_sha256": (sft.get("chat_template") or {}).get("sha256"),
        "stages": stage_rec,
        "judge": {"model": cfg.judge.model, "endpoint_host": (judge_doc or {}).get("endpoint_host"),
                  "prompt_versions": {k: judgekit.prompt_version(v) for k, v in judgekit.PROMPTS.items()},
                  "system_fingerprints": (judge_doc or {}).get("system_fingerprints", [])},
    }
    key = ctx.secret("OPENAI_API_KEY")
    text = json.dumps(record, default=str)
    return json.loads(text.replace(key, "***")) if key and key in text else record

"""Seed replicates scored and summarised: mean +- standard deviation across seeds beside the main run's CI.
Run: SEEDS=1,2 python -m pipeline run seeds   (trains and scores the replicates it needs first: pipeline/seeds.py)

`eval@seed<N>` (one per extra seed, made by pipeline/seeds.py from the main eval's declaration) scores that seed's
replicates on the main eval's question ids with the main eval's own functions: reports/eval/seeds/<N>/eval.json and
reports/eval/seeds/<N>/predictions/<variant>.jsonl. This stage puts them beside the main run (its seed included):
reports/eval/seeds.json, `seeds: {<variant>: {<set>: {mean, sd, n_seeds, per_seed, main}}}`, and
reports/eval_seeds.md. Without SEEDS it is skipped (not requested).
"""
from __future__ import annotations

import json

from pipeline import evidence as ev
from pipeline import seeds as S
from pipeline.core import SkipStage, Stage

REPORT = "reports/eval_seeds.md"


def requested(cfg) -> str | None:
    return None if S.extra_seeds(cfg)[0] else "no extra seeds (SEEDS / runtime.seeds is empty): nothing replicated"


STAGE = Stage(S.AGGREGATE, "reports/eval/seeds.json", needs=(S.EVAL,), requested=requested,
              reads=("runtime.seeds", "runtime.replicate_sft", "runtime.seed"))


def predictions_path(seed: int, variant: str) -> str:
    return f"reports/eval/seeds/{seed}/predictions/{variant}.jsonl"


# --- eval@seed<N>: one seed's replicates, scored -----------------------------------------------------
class Replicas:
    """What eval.predict asks of variants.Variants, for seed replicates: the replicate's final, verified by hash,
    switched on the one base model."""

    def __init__(self, ctx, vs):
        self.ctx, self.vs = ctx, vs

    def use(self, stage: str):
        from pipeline.variants import base_model_path, verified_adapter
        return self.vs.load(base_model_path(self.ctx), verified_adapter(self.ctx, stage), stage.replace("@", "_"))


def trained(registry, stage) -> list[str]:
    """The replicate training stages an eval@seed<N> scores (its needs)."""
    return [n for n in stage.needs if registry[n].replicate is not None]


def run_eval(ctx) -> dict:
    from pipeline.stages import eval as E
    from pipeline.variants import Variants
    cfg, seed = ctx.cfg, ctx.stage.replicate.seed
    if cfg.runtime.force_skip_training:
        raise SkipStage("FORCE_SKIP_TRAINING=true: no replicate to evaluate")
    if not ctx.plan.get("feasible"):
        raise SkipStage(f"hardware plan: {ctx.plan.get('feasible_reason', 'not feasible')} (no model is loaded)")
    sets, fb = E.load_sets(cfg), E.fallback_setup(ctx)
    rows = [r for name in cfg.eval.sets for r in sets[name][0]]
    prompts = [E.messages(r) for r in rows]
    variants, results, outputs = {}, {}, []
    with Variants(ctx) as vs:
        view = Replicas(ctx, vs)
        for stage in trained(ctx.registry, ctx.stage):
            variant, doc = S.main_of(stage), ctx.evidence(stage)
            preds = E.predict(ctx, view, stage, rows, prompts)
            E.apply_fallback(ctx, fb, variant, preds, rows)
            results[variant] = E.summarize(preds, cfg)
            rel = predictions_path(seed, variant)
            ev.atomic_write_text(ctx.path(rel), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
            outputs.append(rel)
            variants[variant] = {"stage": stage, "checkpoint_dir": doc["checkpoint_dir"],
                                 "checkpoint_sha256": doc["checkpoint_sha256"]}
        memory = vs.memory()
    return {"seed": seed, "variants": variants, "results": results, "n_bootstrap": cfg.eval.n_bootstrap,
            "sets": {s: {"planned_n": len(r), "full_size": full, "question_ids": [x["id"] for x in r],
                         "seed": cfg.eval.seed} for s, (r, full) in sets.items()},
            "fallback": {k: v for k, v in fb.items() if not k.startswith("_")}, "memory": memory, "outputs": outputs}


def eval_checks(g, doc) -> list:
    """coverage: every replicate of the seed scored on its current final, on the main eval's question ids;
    numbers: every figure recomputes from the re-scored predictions (the main eval's audit functions)."""
    main, problems = g.doc(S.EVAL) or {}, []
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        problems.append(f"{g.rel} is {'missing' if not isinstance(doc, dict) else doc.get('status')}: "
                        f"{(doc or {}).get('reason') or f'run `python -m pipeline run {g.stage.name}`'}")
    else:
        problems += [f"does not match its schema: {e}" for e in ev.validate("seed_eval", doc)[:1]]
        ids = {s: list(info.get("question_ids") or []) for s, info in (main.get("sets") or {}).items()}
        if not ids:
            problems.append("the main eval (reports/eval/eval_default.json) records no question ids to compare with")
        for stage in trained(g.registry, g.stage):
            variant, metrics = S.main_of(stage), g.doc(stage) or {}
            entry, res = (doc.get("variants") or {}).get(variant) or {}, (doc.get("results") or {}).get(variant) or {}
            if not metrics.get("checkpoint_sha256") or entry.get("checkpoint_sha256") != metrics["checkpoint_sha256"]:
                problems.append(f"{variant}: not scored on the current {stage} final")
            for s, want in ids.items():
                got = (res.get(s) or {}).get("question_ids")
                if got != want:
                    problems.append(f"{variant} on {s}: {len(got or [])} question ids, not the main eval's {len(want)}")
    coverage = g.result("coverage", problems[:8], f"{', '.join(trained(g.registry, g.stage))} scored on the main "
                        "eval's question ids", code=(doc or {}).get("reason_code"))
    if problems:
        return [coverage, g.blocked("numbers", "coverage")]
    return [coverage, g.result("numbers", audit(g.cfg, g.root, doc)[:8], "every accuracy, CI and count recomputes "
                               "from the re-scored predictions")]


def audit(cfg, root, doc: dict) -> list[str]:
    import dataclasses

    from pipeline import eval_audit, evalsets
    from pipeline.stages.eval import summarize
    out, preds, outputs = [], {}, doc.get("outputs") or {}
    for variant in doc.get("results") or {}:
        rel = predictions_path(doc.get("seed"), variant)
        if not (root / rel).is_file() or ev.sha256_file(root / rel) != outputs.get(rel):
            out.append(f"{rel} is missing or does not re-hash to the sha256 its evidence records")
            continue
        preds[variant] = [json.loads(x) for x in (root / rel).read_text(encoding="utf-8").splitlines() if x.strip()]
    if out:
        return out
    eval_audit.rescore(cfg, preds, out)
    sets, seeds = doc.get("sets") or {}, {info.get("seed") for info in (doc.get("sets") or {}).values()}
    if len(seeds) != 1 or not isinstance(doc.get("n_bootstrap"), int):
        return out + ["the evidence records no single eval seed and n_bootstrap: its figures cannot be recomputed"]
    at = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sets=[s for s in evalsets.names() if s in sets],
                                                           seed=seeds.pop(), n_bootstrap=doc["n_bootstrap"]))
    eval_audit.diff(doc.get("results"), {v: summarize(ps, at) for v, ps in preds.items()}, "results", out)
    return out


# --- seeds: the mean +- sd across seeds ------------------------------------------------------------
def summary(main: dict, per_seed_docs: dict, main_seed: int) -> dict:
    """{variant: {set: mean_sd over the main run's accuracy and each replicate's, + the main run's CI}} for every
    variant every seed scored."""
    out: dict = {}
    variants = [v for v in (main.get("results") or {}) if all(v in (d.get("results") or {}) for d in per_seed_docs.values())]
    for v in variants:
        for s, res in main["results"][v].items():
            values = {main_seed: res["accuracy"], **{seed: d["results"][v][s]["accuracy"]
                                                     for seed, d in per_seed_docs.items()}}
            if any(x is None for x in values.values()):
                continue
            out.setdefault(v, {})[s] = S.mean_sd(values) | {"main": {k: res.get(k) for k in
                                                                  ("accuracy", "ci_low", "ci_high", "n")}}
    return out


def markdown(doc: dict, tier: str) -> str:
    from pipeline.reporting import md_table, pct
    rows = [[v, s, f"{pct(e['main']['accuracy'])} [{pct(e['main']['ci_low'])}, {pct(e['main']['ci_high'])}]",
             f"{pct(e['mean'])} ± {pct(e['sd']) if e['sd'] is not None else 'n/a'}", e["n_seeds"],
             ", ".join(f"{k}: {pct(x)}" for k, x in e["per_seed"].items())]
            for v, sets in doc["seeds"].items() for s, e in sets.items()]
    return "\n".join([
        f"# Seed replicates: {tier} tier", "", "Source of every number below: `reports/eval/seeds.json` (per seed: "
        "`reports/eval/seeds/<seed>/eval.json`; the main run: `reports/eval/eval_default.json`).", "",
        f"Main run seed {doc['main_seed']}, extra seeds {', '.join(map(str, doc['extra_seeds']))}; SFT "
        + ("replicated per seed" if doc["replicate_sft"] else "shared (the preference replicates start from the "
           "main SFT final)") + ". Every seed answers the same question ids.", "",
        md_table(["variant", "set", "main run (95% CI)", "mean ± sd across seeds", "seeds", "per seed"], rows), "",
        "sd: the sample standard deviation across seeds (n - 1). A CI is the uncertainty of one run from the "
        "questions; the sd is the spread from the training seed.", *[f"- {n}" for n in doc["notes"]], ""])


def run(ctx) -> dict:
    cfg = ctx.cfg
    seeds, notes = S.extra_seeds(cfg)
    main = ctx.evidence(S.EVAL) or {}
    docs = {seed: ctx.evidence(S.name(S.EVAL, seed)) or {} for seed in seeds}
    doc = {"main_seed": cfg.runtime.seed, "extra_seeds": seeds, "replicate_sft": cfg.runtime.replicate_sft,
           "notes": notes, "seeds": summary(main, docs, cfg.runtime.seed)}
    ev.atomic_write_text(ctx.path(REPORT), markdown(doc, cfg.tier))
    return doc | {"outputs": [REPORT]}


def checks(g, doc) -> list:
    """seeds.summary: when SEEDS asks for it, the mean and sd recompute from the main eval and each seed's eval."""
    if isinstance(doc, dict) and doc.get("status") == "skipped" and doc.get("reason_code") == "not_requested" \
            and not S.extra_seeds(g.cfg)[0]:
        return [g.result("summary", [], "no extra seeds asked for (SEEDS is empty)")]
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return [g.result("summary", [f"{g.rel} is {(doc or {}).get('status', 'missing')}: "
                                     f"{(doc or {}).get('reason') or 'run `python -m pipeline run seeds`'}"], "")]
    seeds = S.extra_seeds(g.cfg)[0]
    docs = {seed: g.doc(S.name(S.EVAL, seed)) or {} for seed in seeds}
    problems = [f"does not match its schema: {e}" for e in ev.validate(S.AGGREGATE, doc)[:1]]
    if doc.get("extra_seeds") != seeds:
        problems.append(f"extra_seeds {doc.get('extra_seeds')} are not the seeds SEEDS asks for now ({seeds})")
    want = summary(g.doc(S.EVAL) or {}, docs, g.cfg.runtime.seed)
    if not want:
        problems.append("no variant was scored by the main run and by every seed")
    from pipeline.eval_audit import diff
    diff(doc.get("seeds"), want, "seeds", problems)
    return [g.result("summary", problems[:8], f"mean ± sd of {len(want)} variant(s) over {len(seeds) + 1} seeds "
                     "recompute from the main eval and each seed's eval")]

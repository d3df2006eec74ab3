"""Merged weights per trained variant, that answer like the adapter.  Run: make export-merged
(python -m pipeline run export_merged; MERGE_FINAL=true adds it to `make gpu-run`)

For each trained variant, one base model at a time: its verified final adapter on the base (variants.Variants)
answers a seeded subset of the eval questions and the gate's probe prompt greedily; the adapter is merged into
the base in the plan's dtype (peft merge_and_unload; a QLoRA adapter into its nf4 base dequantized to the compute
dtype, the weights it was trained on), saved as a plain transformers folder (safetensors, the adapter's tokenizer
and chat template, a generation config whose eos ids hold the chat's end-of-turn token), loaded back without PEFT
and asked the same prompts. It becomes checkpoints/<variant folder>/merged only when it gives the adapter's probe
tokens and agrees on at least export.parity_threshold of the extracted answers and of the first generated tokens;
else it is failed and kept aside as merged.failed (never exported). Writes reports/export/merge_parity.json.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline import evalsets, models
from pipeline import evidence as ev
from pipeline.core import SkipStage, Stage, StageFailed
from pipeline.data import sample_rows
from pipeline.stages.eval import extract, load_sets, messages
from pipeline.training_checks import PROBE_PROMPT, PROBE_TOKENS
from pipeline.variants import Variants, base_model_path, generate, generation_config, variant_table

STAGE = Stage("export_merged", "reports/export/merge_parity.json", needs=("eval",), needs_methods=True, reads=(
    *evalsets.reads(), "eval.sets", "eval.sample_sizes", "eval.seed", "eval.batch_size", "eval.max_new_tokens",
    "export.parity_threshold", "export.parity_per_set", "model.name", "model.tiny_seed", "runtime.rehearsal"),
    untracked=("export.merge_final",), inputs=evalsets.files, in_all=False, in_all_when="export.merge_final")

FIRST_TOKENS = PROBE_TOKENS   # "the first generated tokens": as many as the gate's probe generates
GB = 1e9


def parity_rows(cfg) -> dict:
    """{set: rows}: a seeded subset of the questions eval scored (export.parity_per_set, at most eval's sample)."""
    return {name: sample_rows(rows, min(cfg.export.parity_per_set, len(rows)), cfg.eval.seed)
            for name, (rows, _) in load_sets(cfg).items()}


def answers(ctx, model, tok, rows: list[dict], label: str) -> dict:
    """One model's greedy answers to the rows (raw text, first generated token ids, extracted answer) and its
    tokens for the gate's probe (PROBE_PROMPT, PROBE_TOKENS greedy tokens, as the gate generates them)."""
    cfg, ids, probe = ctx.cfg, [], []
    raws = generate(model, tok, [messages(r) for r in rows], cfg.eval.batch_size, cfg.eval.max_new_tokens,
                    ctx.progress, label, token_ids=ids)
    text = generate(model, tok, [[{"role": "user", "content": PROBE_PROMPT}]], 1, PROBE_TOKENS, token_ids=probe)
    return {"raw": raws, "ids": [row[:FIRST_TOKENS] for row in ids], "probe_ids": probe[0], "probe_text": text[0],
            "extracted": [extract(r, raw)[0] for r, raw in zip(rows, raws)]}


def agreement(a: dict, m: dict, rows: list[dict]) -> dict:
    """Per set and over all rows: the share of questions on which the merged model's extracted answer, first
    generated tokens and whole text equal the adapter's."""
    out = {}
    for name in [*dict.fromkeys(r["set"] for r in rows), None]:
        idx = [i for i, r in enumerate(rows) if name is None or r["set"] == name]
        share = {k: sum(a[k][i] == m[k][i] for i in idx) / len(idx) for k in ("extracted", "ids", "raw")}
        out[name or "all"] = {"n": len(idx), "answer_agreement": share["extracted"],
                              "first_token_agreement": share["ids"], "text_agreement": share["raw"]}
    return out


def verdict(a: dict, m: dict, rows: list[dict], threshold: float) -> dict:
    """The parity record: it passes with the adapter's probe tokens and both agreements >= threshold."""
    agree = agreement(a, m, rows)
    same = a["probe_ids"] == m["probe_ids"]
    low = [k for k in ("answer_agreement", "first_token_agreement") if agree["all"][k] < threshold]
    why = ([] if same else [f"probe tokens differ ({a['probe_text']!r} vs {m['probe_text']!r})"]) + [
        f"{k} {agree['all'][k]:.3f} < {threshold}" for k in low]
    return {"threshold": threshold, "first_tokens": FIRST_TOKENS, "passed": not why, "why": "; ".join(why) or None,
            **agree["all"], "per_set": agree,
            "probe": {"prompt": PROBE_PROMPT, "tokens": PROBE_TOKENS, "identical": same,
                      "adapter_ids": a["probe_ids"], "merged_ids": m["probe_ids"],
                      "adapter_text": a["probe_text"], "merged_text": m["probe_text"]},
            "disagreements": [{"id": r["id"], "adapter": a["raw"][i], "merged": m["raw"][i]}
                              for i, r in enumerate(rows) if a["raw"][i] != m["raw"][i]][:5]}


def merge(model, name: str):
    """Variant `name`'s adapter merged into its base: `model` is the PeftModel (its base in the compute dtype)."""
    return model.merge_and_unload(safe_merge=True)


def save(merged, tok_src: Path, folder: Path) -> dict:
    """merged -> a plain transformers folder: safetensors, the adapter's tokenizer files (its chat template) and a
    generation config whose eos ids are the model's and the tokenizer's (the chat's end of turn)."""
    from transformers import AutoTokenizer
    need = sum(p.numel() * p.element_size() for p in merged.parameters()) * 1.05 + 0.05 * GB
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise StageFailed(f"{folder.parent}: the merged weights need {need / GB:.1f} GB, its disk has "
                          f"{free / GB:.1f} GB free: free space, or move PIPELINE_ROOT (the whole output root) to "
                          "the data disk", code="disk_full")
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    gen = merged.generation_config.to_dict() | {
        "eos_token_id": generation_config(merged, tok, 1).eos_token_id,
        "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    merged.generation_config = type(merged.generation_config).from_dict(gen)
    merged.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return {"chat_template_sha256": models.chat_template_sha256(tok), "eos_token_id": gen["eos_token_id"],
            "dtype": str(next(merged.parameters()).dtype).removeprefix("torch.")}


def merge_into(ctx, name: str, rows: list[dict], folder: Path, identity: str) -> tuple[dict, dict]:
    """The adapter's answers on its verified final (variants.Variants), then the merge saved to `folder`:
    (answers, facts). Under QLoRA the adapter goes afresh onto its nf4 base dequantized to the compute dtype."""
    plan, base = ctx.plan, base_model_path(ctx)
    final = ctx.root / ctx.evidence(name)["checkpoint_dir"]
    with Variants(ctx) as vs:
        model, tok = vs.use(name)   # re-hashes the final against its metrics first
        ref = answers(ctx, model, tok, rows, f"{name} adapter")
        if plan["quantization"] == "nf4":
            from peft import PeftModel
            del model
            vs.close()
            model = models.load_model(base, plan)
            model.dequantize()
            model = PeftModel.from_pretrained(model, str(final), is_trainable=False)
        merged = merge(model, name)
        del model
        folder.mkdir(parents=True)
        facts = save(merged, final if (final / "tokenizer_config.json").is_file() else Path(base), folder)
        del merged
    kind = "nf4 base dequantized to the compute dtype" if plan["quantization"] else "base in the plan's dtype"
    return ref, facts | {"adapter_dir": final.relative_to(ctx.root).as_posix(),
                         "adapter_sha256": ctx.evidence(name).get("checkpoint_sha256"),
                         "merge_base": {"path": base, "identity": identity, "kind": kind,
                                        "quantization": plan["quantization"]}}


def export_variant(ctx, name: str, rows: list[dict], identity: str) -> tuple[dict, int]:
    """One variant, one base model alive at a time: merge, reload the folder without PEFT, compare, then move it
    to merged (passed) or merged.failed; (its entry, the most base models alive)."""
    t0 = time.monotonic()
    home = ctx.root / ctx.registry[name].checkpoint(ctx.cfg)
    tmp, final, aside = (home / f"merged{s}" for s in (".tmp", "", ".failed"))
    for old in (tmp, final, aside):   # an earlier merge of this variant is never mixed with this one
        shutil.rmtree(old, ignore_errors=True)
    ref, facts = merge_into(ctx, name, rows, tmp, identity)
    models.release()
    model = models.load_model(tmp, {**ctx.plan, "quantization": None})   # plain weights in the plan's dtype
    out = answers(ctx, model, models.load_tokenizer(tmp, padding_side="left"), rows, f"{name} merged")
    del model
    models.release()
    parity = verdict(ref, out, rows, ctx.cfg.export.parity_threshold)
    where = final if parity["passed"] else aside
    tmp.rename(where)
    return {"status": "exported" if parity["passed"] else "failed", "reason": parity.pop("why"),
            "merged_dir": where.relative_to(ctx.root).as_posix(), "files": ev.sha256_tree(where), **facts,
            "parity": parity, "seconds": round(time.monotonic() - t0, 2)}, models.live_high_water()


def run(ctx) -> dict:
    cfg, t0 = ctx.cfg, time.monotonic()
    if not ctx.plan.get("feasible"):
        raise SkipStage(f"hardware plan: {ctx.plan.get('feasible_reason', 'not feasible')} (no model is loaded)")
    table = {k: v for k, v in variant_table(ctx).items() if k != "base"}
    if not any(v["status"] == "scored" for v in table.values()):
        raise SkipStage("no trained variant to merge: run `make gpu-run` first")
    sets = parity_rows(cfg)
    rows = [r for name in cfg.eval.sets for r in sets[name]]
    variants, peak, outputs = {}, 0, []
    identity = models.base_model_identity(base_model_path(ctx))   # sha256 of a local base folder, or the hub id
    for name, entry in table.items():
        if entry["status"] != "scored":
            variants[name] = {"status": "skipped", "reason": entry["reason"]}
            continue
        ctx.log(f"{name}: merging the adapter and checking it on {len(rows)} questions and the probe")
        variants[name], most = export_variant(ctx, name, rows, identity)
        peak = max(peak, most)
        outputs.append(variants[name]["merged_dir"])
        ctx.log(f"{name}: {variants[name]['status']} ({variants[name]['reason'] or 'answers like the adapter'})")
    failed = [n for n, v in variants.items() if v["status"] == "failed"]
    doc = {"merge_final": cfg.export.merge_final, "threshold": cfg.export.parity_threshold,
           "per_set": cfg.export.parity_per_set,
           "question_ids": {s: [r["id"] for r in rs] for s, rs in sets.items()},
           "plan": {k: ctx.plan.get(k) for k in ("device", "precision", "quantization")}, "variants": variants,
           "exported": [n for n, v in variants.items() if v["status"] == "exported"], "failed": failed,
           "memory": {"max_live_models": peak}, "wall_s": round(time.monotonic() - t0, 2), "outputs": outputs}
    if failed:
        doc |= {"status": "failed", "reason": f"merged weights of {', '.join(failed)} do not answer like the "
                f"adapter (kept aside as merged.failed, not exported): {variants[failed[0]]['reason']}"}
    return doc

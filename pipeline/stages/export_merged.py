"""Merged weights per trained variant, that answer like the adapter.  Run: make export-merged
(python -m pipeline run export_merged; MERGE_FINAL=true adds it to `make gpu-run`)

For each trained variant, one base model at a time: its verified final adapter on the base (variants.Variants)
answers a seeded subset of the eval questions and the gate's probe prompt greedily; the adapter is merged into the
base in the plan's dtype (peft merge_and_unload; a QLoRA adapter into its nf4 base dequantized to the compute dtype,
the weights it was trained on), saved as a plain transformers folder (safetensors, the adapter's tokenizer and chat
template, a generation config whose eos ids hold the chat's end-of-turn token), loaded back without PEFT and asked
the same prompts. It becomes checkpoints/<variant folder>/merged only when it gives the adapter's probe tokens and
agrees on at least export.parity_threshold of the extracted answers and of the first generated tokens; else it is
failed and kept aside as merged.failed (never exported). Writes reports/export/merge_parity.json.
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
    """{set: rows}: a seeded subset (export.parity_per_set, at most the eval's sample) of the questions eval scored."""
    return {name: sample_rows(rows, min(cfg.export.parity_per_set, len(rows)), cfg.eval.seed)
            for name, (rows, _) in load_sets(cfg).items()}


def answers(ctx, model, tok, rows: list[dict], label: str) -> dict:
    """Greedy answers of one model: raw texts, generated ids and extracted answers on the rows, and the probe's
    tokens (the gate's PROBE_PROMPT, PROBE_TOKENS greedy tokens)."""
    cfg, ids, probe = ctx.cfg, [], []
    raws = generate(model, tok, [messages(r) for r in rows], cfg.eval.batch_size, cfg.eval.max_new_tokens,
                    ctx.progress, f"{label}", token_ids=ids)
    probe_text = generate(model, tok, [[{"role": "user", "content": PROBE_PROMPT}]], 1, PROBE_TOKENS, token_ids=probe)
    return {"raw": raws, "ids": ids, "extracted": [extract(r, raw)[0] for r, raw in zip(rows, raws)],
            "probe_ids": probe[0], "probe_text": probe_text[0]}


def agreement(a: dict, m: dict, rows: list[dict], sets: list[str]) -> dict:
    """Per set and overall: the share of questions where the merged model's extracted answer, first generated
    tokens and whole text equal the adapter's."""
    def share(idx, key):
        same = [(a[key][i] == m[key][i]) if key != "ids" else a["ids"][i][:FIRST_TOKENS] == m["ids"][i][:FIRST_TOKENS]
                for i in idx]
        return sum(same) / len(same) if same else None
    out = {}
    for name in [*sets, None]:
        idx = [i for i, r in enumerate(rows) if name is None or r["set"] == name]
        out[name or "all"] = {"n": len(idx), "answer_agreement": share(idx, "extracted"),
                              "first_token_agreement": share(idx, "ids"), "text_agreement": share(idx, "raw")}
    return out


def merge(model, name: str):
    """Variant `name`'s adapter merged into its base: `model` is the PeftModel (its base in the compute dtype)."""
    return model.merge_and_unload(safe_merge=True)


def save(merged, tok_src: Path, folder: Path, ctx) -> dict:
    """merged -> a plain transformers folder: safetensors, the adapter's tokenizer files (its chat template) and a
    generation config whose eos ids are the model's and the tokenizer's (the chat's end of turn)."""
    from transformers import AutoTokenizer
    need = sum(p.numel() * p.element_size() for p in merged.parameters()) * 1.05 + 0.05 * GB
    free = shutil.disk_usage(folder.parent).free
    if free < need:
        raise StageFailed(f"{folder.parent}: the merged weights need {need / GB:.1f} GB, the disk has {free / GB:.1f} "
                          "GB free: free space, or move PIPELINE_ROOT to the data disk (the run's checkpoints too)",
                          code="disk_full")
    tok = AutoTokenizer.from_pretrained(str(tok_src))
    merged.generation_config = merged.generation_config.__class__.from_dict(
        merged.generation_config.to_dict() | {
            "eos_token_id": generation_config(merged, tok, 1).eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id})
    merged.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return {"chat_template_sha256": models.chat_template_sha256(tok), "eos_token_id": merged.generation_config.eos_token_id,
            "dtype": str(next(merged.parameters()).dtype).removeprefix("torch.")}


def export_variant(ctx, name: str, rows: list[dict]) -> tuple[dict, int]:
    """One variant: adapter answers, merge, save, merged answers, verdict; (its entry, most base models alive)."""
    cfg, plan, t0 = ctx.cfg, ctx.plan, time.monotonic()
    home = ctx.root / ctx.registry[name].checkpoint(cfg)
    tmp, final, aside = (home / f"merged{s}" for s in (".tmp", "", ".failed"))
    for old in (tmp, final, aside):   # an earlier merge of this variant is never mixed with this one
        shutil.rmtree(old, ignore_errors=True)
    quantized = plan["quantization"] == "nf4"
    base = base_model_path(ctx)
    with Variants(ctx) as vs:
        model, tok = vs.use(name)   # re-hashes the final against its metrics first
        adapter_dir = Path(ctx.evidence(name)["checkpoint_dir"])
        tok_src = ctx.root / adapter_dir if (ctx.root / adapter_dir / "tokenizer_config.json").is_file() else Path(base)
        ref = answers(ctx, model, tok, rows, f"{name} adapter")
        if quantized:   # merge into the dequantized nf4 base: the adapter is loaded afresh onto it
            del model
            vs.close()
            from peft import PeftModel
            model = models.load_model(base, plan)
            model.dequantize()
            model = PeftModel.from_pretrained(model, str(ctx.root / adapter_dir), is_trainable=False)
        merged = merge(model, name)
        del model
        tmp.mkdir(parents=True)
        facts = save(merged, tok_src, tmp, ctx)
        del merged
        peak = models.live_high_water()
    models.release()
    merged_plan = {**plan, "quantization": None}   # the merged folder loads as plain weights in the plan's dtype
    model = models.load_model(tmp, merged_plan)
    out = answers(ctx, model, models.load_tokenizer(tmp, padding_side="left"), rows, f"{name} merged")
    del model
    models.release()
    peak = max(peak, models.live_high_water())
    sets = list(dict.fromkeys(r["set"] for r in rows))
    agree = agreement(ref, out, rows, sets)
    threshold = cfg.export.parity_threshold
    probe_same = ref["probe_ids"] == out["probe_ids"]
    low = [k for k in ("answer_agreement", "first_token_agreement") if (agree["all"][k] or 0) < threshold]
    passed = probe_same and not low
    why = None if passed else "; ".join(
        ([f"probe tokens differ ({ref['probe_text']!r} vs {out['probe_text']!r})"] if not probe_same else [])
        + [f"{k} {agree['all'][k]:.3f} < {threshold}" for k in low])
    where = final if passed else aside
    tmp.rename(where)
    rel = where.relative_to(ctx.root).as_posix()
    return {"status": "exported" if passed else "failed", "reason": why, "merged_dir": rel,
            "files": ev.sha256_tree(where), "adapter_dir": adapter_dir.as_posix(),
            "adapter_sha256": ctx.evidence(name).get("checkpoint_sha256"),
            "merge_base": {"path": base, "identity": models.base_model_identity(base),
                           "kind": "nf4 base dequantized to the compute dtype" if quantized else "base in the plan's dtype",
                           "quantization": plan["quantization"]}, **facts,
            "parity": {"threshold": threshold, "first_tokens": FIRST_TOKENS, "passed": passed, "per_set": agree,
                       **agree["all"], "probe": {"prompt": PROBE_PROMPT, "tokens": PROBE_TOKENS, "identical": probe_same,
                                                 "adapter_ids": ref["probe_ids"], "merged_ids": out["probe_ids"],
                                                 "adapter_text": ref["probe_text"], "merged_text": out["probe_text"]},
                       "disagreements": [{"id": r["id"], "adapter": ref["raw"][i], "merged": out["raw"][i]}
                                         for i, r in enumerate(rows) if ref["raw"][i] != out["raw"][i]][:5]},
            "seconds": round(time.monotonic() - t0, 2)}, peak


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
    for name, entry in table.items():
        if entry["status"] != "scored":
            variants[name] = {"status": "skipped", "reason": entry["reason"]}
            continue
        ctx.log(f"{name}: merging the adapter and checking it on {len(rows)} questions and the probe")
        variants[name], most = export_variant(ctx, name, rows)
        peak = max(peak, most)
        outputs.append(variants[name]["merged_dir"])
        ctx.log(f"{name}: {variants[name]['status']} ({variants[name]['reason'] or 'answers like the adapter'})")
    failed = [n for n, v in variants.items() if v["status"] == "failed"]
    doc = {"merge_final": cfg.export.merge_final, "threshold": cfg.export.parity_threshold,
           "per_set": cfg.export.parity_per_set, "question_ids": {s: [r["id"] for r in rs] for s, rs in sets.items()},
           "plan": {k: ctx.plan.get(k) for k in ("device", "precision", "quantization")}, "variants": variants,
           "exported": [n for n, v in variants.items() if v["status"] == "exported"], "failed": failed,
           "memory": {"max_live_models": peak}, "wall_s": round(time.monotonic() - t0, 2), "outputs": outputs}
    if failed:
        doc |= {"status": "failed", "reason": f"merged weights of {', '.join(failed)} do not answer like the adapter "
                f"(kept aside as merged.failed, not exported): {variants[failed[0]]['reason']}"}
    return doc

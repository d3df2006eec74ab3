"""The gate's checks of a training stage, defined once for every method (sft, dpo, simpo, kto, and any method
added to the registry): each stage file does `from pipeline.training_checks import checks`.

`g` is the gate's view of one stage (pipeline.gate.Gate): cfg, root, registry, the hardware plan, the shared
loaded-base Variants probe (`g.vs`), `g.stage` and its evidence path `g.rel`; `doc` is that stage's evidence.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline import evidence as ev
from pipeline.seeds import main_of as _main   # a replicate's start "sft@seed2": ids and messages say "sft"
from pipeline.training_record import start_stage

CPU_PLAN = {"device": "cpu", "precision": "fp32", "attn_implementation": "sdpa", "quantization": None}
PROBE_PROMPT = "Which organ pumps blood through the human body? Answer in one word."
PROBE_TOKENS = 4
INVARIANT_FIELDS = ("precision.dtype", "precision.trainable_dtype", "memory.max_live_models")
ABSENT = object()


def checks(g, doc) -> list:
    """metrics, checkpoint, loads, curve, steps, base_model, invariants and, for a method that trains on from
    another's final, from_<start>, and for one that declares a reference (Method.reference), reference.
    Everything after metrics is blocked when the metrics are not this stage's ok."""
    metrics = check_metrics(g, doc)
    start = start_stage(g.stage) if g.stage.method and start_stage(g.stage) in g.registry else None
    refers = bool(start) and g.stage.method.reference != "none"
    kinds = ["checkpoint", "loads", "curve", "steps", "base_model", "invariants"]
    kinds += ([f"from_{_main(start)}"] if start else []) + (["reference"] if refers else [])
    if not isinstance(doc, dict) or doc.get("status") != "ok" or doc.get("stage") != g.stage.name:
        return [metrics] + [g.blocked(k, "metrics", g.rel) for k in kinds]
    checkpoint = check_checkpoint(g, doc)
    loads = check_loads(g, doc) if checkpoint.passed else g.blocked("loads", "checkpoint", checkpoint.evidence)
    out = [metrics, checkpoint, loads, check_curve(g, doc), check_steps(g, doc), check_base(g, doc),
           check_invariants(g, doc)]
    out += [check_from_start(g, doc, start)] if start else []
    return out + ([check_reference(g, doc, start)] if refers else [])


def final_dir(g, stage=None) -> str:
    """Where CONTRACT.md puts the stage's final checkpoint: its method's folder + /final."""
    return f"{(stage or g.stage).checkpoint(g.cfg)}/final"


def check_metrics(g, doc):
    name, rel = g.stage.name, g.rel
    if not isinstance(doc, dict):
        return g.result("metrics", [f"{rel} is missing or not valid JSON: the stage never finished"], "")
    problems = []
    if doc.get("stage") != name:
        problems.append(f"{rel} holds evidence of stage {doc.get('stage')!r}, not {name!r} (a copied file?)")
    if doc.get("status") != "ok":
        problems.append(f"status is {doc.get('status')!r}: {doc.get('reason') or 'no reason recorded'}")
    if doc.get("status") == "ok" and doc.get("skipped") is not False:
        problems.append(f"skipped is {doc.get('skipped')!r}, expected false")
    errors = ev.validate(g.stage.schema or name, doc)
    if errors:
        problems.append(f"does not match its schema ({len(errors)} error(s)): {errors[0]}")
    if doc.get("model_tier") != g.cfg.tier:
        problems.append(f"trained for tier {doc.get('model_tier')!r} but the config says {g.cfg.tier!r}")
    code = doc.get("reason_code") if doc.get("status") != "ok" else None   # the code the stage raised
    return g.result("metrics", problems, f"{rel} is valid, status ok, tier {g.cfg.tier}", code=code)


def check_checkpoint(g, doc):
    want, rel, recorded = final_dir(g), g.rel, doc.get("checkpoint_files")
    if doc.get("checkpoint_dir") != want:
        return g.result("checkpoint", [f"checkpoint_dir is {doc.get('checkpoint_dir')!r}, expected {want!r}"], "")
    folder = g.root / want
    if not folder.is_dir():
        return g.result("checkpoint", [f"{want} does not exist"], "", want)
    if not isinstance(recorded, dict) or not recorded:
        return g.result("checkpoint", [f"{rel} records no checkpoint_files"], "")
    now, diff = ev.verify_tree(folder, recorded)
    problems = [f"{label} file(s) in {want}: {', '.join(names[:5])}" for label, names in diff.items()]
    if doc.get("checkpoint_sha256") != ev.sha256_json(recorded):
        problems.append("checkpoint_sha256 does not match checkpoint_files")
    return g.result("checkpoint", problems, f"{want}: {len(now)} files re-hash to the recorded sha256", want)


def probe_checkpoint(vs, base: str, adapter_dir) -> tuple[bool, str]:
    """Load the final checkpoint on its base model (vs: the gate's variants.Variants, which keeps one base
    loaded for every probe) and greedily generate a few tokens, at least one of them visible text (not only EOS or
    other special tokens, not only whitespace): (ok, text or error)."""
    try:
        import torch
        from pipeline.variants import generation_config
        adapter_dir = Path(adapter_dir)
        if (adapter_dir / "adapter_config.json").is_file():
            model, tok = vs.load(base, adapter_dir, "probe")
        else:   # a full model folder is its own base
            model, tok = vs.load(adapter_dir)
        text = (tok.apply_chat_template([{"role": "user", "content": PROBE_PROMPT}], tokenize=False,
                                        add_generation_prompt=True) if tok.chat_template else PROBE_PROMPT)
        enc = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template).to(model.device)
        config = generation_config(model, tok, PROBE_TOKENS, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        new = out.sequences[0, enc["input_ids"].shape[1]:]
        if len(new) == 0:
            return False, "generated no token"
        if not all(torch.isfinite(s).any() for s in out.scores):
            return False, "generation produced non-finite logits (NaN/inf weights)"
        text = tok.decode(new, skip_special_tokens=False)
        if not tok.decode(new, skip_special_tokens=True).strip():   # e.g. EOS first: eval would score ""
            return False, (f"generated {text!r}: no visible text, only special tokens or whitespace (the model "
                           "ends its answer at once; a learning rate too high for the rows?)")
        return True, text
    except Exception as exc:  # noqa: BLE001 - the check reports any load/generate error as its detail
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def check_loads(g, doc):
    """The final loads on the base the config names now (base_model checks it is the one trained on) and
    generates."""
    want, (base, error) = final_dir(g), expected_base(g.cfg)
    if error:
        return g.result("loads", [f"{want}: no base model to load it on: {error}"], "", want)
    ok, text = probe_checkpoint(g.vs, base, g.root / want)
    base = ev.root_relative(g.root, base)
    where = f"{g.vs.plan['device']}/{g.vs.plan['precision']}"
    if ok:
        return g.result("loads", [], f"{want} loads on {base} ({where}) and generates {text!r}", want)
    return g.result("loads", [f"{want} on {base} ({where}) failed: {text}"], "", want)


def _curve_points(rows) -> list[tuple[float, float]] | None:
    try:
        return [(float(s), float(v)) for s, v in rows]
    except (TypeError, ValueError):
        return None


def check_curve(g, doc):
    folder, root = final_dir(g), g.root
    state_rel, files = doc.get("trainer_state_file") or "", doc.get("checkpoint_files") or {}
    inner = state_rel[len(folder) + 1:] if state_rel.startswith(folder + "/") else None
    curve = _curve_points(doc.get("loss_curve") or [])
    problems = []
    if inner is None or inner not in files:
        problems.append(f"trainer_state_file {state_rel!r} is not one of the hashed files of {folder}")
    elif not (root / state_rel).is_file():
        problems.append(f"{state_rel} is missing")
    else:
        sha = ev.sha256_file(root / state_rel)
        if not (sha == doc.get("trainer_state_sha256") == files[inner]):
            problems.append(f"{state_rel} does not hash to the recorded trainer_state_sha256")
        state = ev.read_json(root / state_rel) or {}
        logged = _curve_points([[e.get("step"), e["loss"]] for e in state.get("log_history", []) if "loss" in e])
        same = (curve is not None and logged is not None and len(curve) == len(logged)
                and all(a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-9)
                        for a, b in zip(curve, logged)))
        if not same:
            problems.append(f"loss_curve does not match the losses in the trainer's own log {state_rel}")
    if curve is None:
        return g.result("curve", problems + ["loss_curve is not a list of [step, loss]"], "")
    finite = [v for _, v in curve if math.isfinite(v)]
    if len(curve) < 3 or len(finite) < len(curve):
        problems.append(f"loss_curve has {len(curve)} points, {len(finite)} finite: need >= 3, all finite")
        return g.result("curve", problems, "")
    k = len(curve) // 3
    first, last = sum(finite[:k]) / k, sum(finite[-k:]) / k
    if not last < first:
        problems.append(f"the loss did not go down (mean of the first third {first:.4f}, of the last third "
                        f"{last:.4f})")
    return g.result("curve", problems, f"{len(curve)} losses match the trainer's own log; mean {first:.4f} "
                    f"(first third) -> {last:.4f} (last)")


def check_steps(g, doc):
    train = getattr(g.cfg, g.stage.kind)
    planned, step = train.max_steps, doc.get("global_step")
    problems = []
    if step != planned or doc.get("planned_max_steps") != planned:
        problems.append(f"global_step {step} / planned_max_steps {doc.get('planned_max_steps')}, "
                        f"config plans {planned}")
    state = ev.read_json(g.root / (doc.get("trainer_state_file") or "-")) or {}
    if "global_step" in state and state["global_step"] != step:
        problems.append(f"the trainer's own log says global_step {state['global_step']}, the metrics say {step}")
    want = [(c["max_length"], c["until_step"]) for c in train.curriculum]
    got = doc.get("curriculum") or []
    if [(c.get("max_length"), c.get("planned_step")) for c in got] != want:
        problems.append(f"curriculum {got} does not follow the configured plan {train.curriculum}")
    short = [c for c in got
             if not (isinstance(c.get("reached_step"), int) and c["reached_step"] >= c.get("planned_step", 0))]
    if short:
        problems.append(f"curriculum sub-stage(s) stopped early: {short}")
    return g.result("steps", problems, f"global_step {step} = plan {planned}"
                    + (f"; {len(got)} curriculum sub-stages reached" if got else ""))


def expected_base(cfg) -> tuple[str | None, str | None]:
    """(the base model the config names now, None) or (None, why there is none). The local tiny/demo build is
    made where it is missing (an unpacked export has no model cache; the build is deterministic and base_model
    compares its hash); a hub model is never downloaded here."""
    from pipeline.models import base_for
    try:
        return base_for(cfg), None   # in a rehearsal, the stand-in
    except (ValueError, RuntimeError, OSError) as exc:   # a MODEL_NAME that names nothing, a failed demo fetch
        return None, str(exc)


def check_base(g, doc):
    """The base model the stage trained on is the one the config names now, by content (models.base_model_identity:
    a folder's file hashes, a hub id at its revision), wherever the root or the model folder lies now."""
    from pipeline.models import base_model_identity, same_base
    (base, error), recorded = expected_base(g.cfg), doc.get("base_model_identity")
    if error:
        return g.result("base_model", [f"the config's base model: {error}"], "")
    want, now = ev.root_relative(g.root, base), base_model_identity(base)
    if not isinstance(recorded, str):
        problems = [f"{g.rel} records no base_model_identity (evidence older than the field: re-run the stage)"]
    elif not _names(g.root, doc.get("base_model"), base):
        problems = [f"base_model {doc.get('base_model')!r}, config names {want!r}"]
    else:
        problems = [] if same_base(recorded, now) else [
            f"trained on base_model {doc.get('base_model')!r} (identity {_short(recorded)}), but the config's "
            f"{want} is {_short(now)}: another model, or its files changed since"]
    return g.result("base_model", problems, f"trained on {want} ({_short(now)}: the same model now)")


def _names(root: Path, recorded, base: str) -> bool:
    """The recorded base_model names the config's base: the same hub id or root-relative folder, or, where the
    config names a folder, a folder elsewhere (a moved root or model folder: the identity decides)."""
    if not isinstance(recorded, str):
        return False
    folder = recorded.startswith("/") or (root / recorded).is_dir()
    return recorded == ev.root_relative(root, base) or (Path(base).is_dir() and folder)


def _short(identity: str) -> str:
    """A folder's sha256 by its first 12 digits; a hub id@revision whole."""
    return f"sha256 {identity[:12]}" if len(identity) == 64 and "/" not in identity else identity


def check_from_start(g, doc, start: str):
    """The method started from the final of `start` (sft, or a seed replicate's) as it is on disk now (hash
    match)."""
    start_dir, got = final_dir(g, g.registry[start]), doc.get("start_checkpoint") or {}
    start = _main(start)
    problems = []
    if got.get("dir") != start_dir:
        problems.append(f"start_checkpoint.dir is {got.get('dir')!r}, expected the {start.upper()} final "
                        f"{start_dir}")
    folder = g.root / start_dir
    if not folder.is_dir():
        problems.append(f"the {start.upper()} final {start_dir} is missing")
    elif got.get("checkpoint_sha256") != ev.sha256_json(ev.verify_tree(folder, {})[0]):
        problems.append(f"{g.stage.name} started from an {start.upper()} final that is no longer on disk "
                        f"({start_dir} changed since)")
    return g.result(f"from_{start}", problems, f"started from {start_dir} as it is on disk now (hash match)")


def check_reference(g, doc, start: str):
    """The reference the trainer compared against (recorded when training began) is the declared kind and hashes
    to the adapter of the `start` final as it is on disk now: recomputed here, the recorded flag is not trusted."""
    from pipeline import reference
    want_kind, start_dir = g.stage.method.reference, final_dir(g, g.registry[start])
    start = _main(start)
    got = doc.get("reference")
    if not isinstance(got, dict):
        return g.result("reference", [f"{g.rel} records no reference (evidence older than the field: re-run the "
                                      "stage)"], "")
    try:
        want = reference.saved_adapter_sha256(g.root / start_dir)
    except Exception as exc:  # noqa: BLE001 - an unreadable adapter file is this check's failure, not a traceback
        want = None
        problems = [f"{start_dir}/{reference.ADAPTER_FILE} is not a readable adapter: {type(exc).__name__}"]
    else:
        problems = [] if want else [f"{start_dir} has no {reference.ADAPTER_FILE} with LoRA tensors"]
    if got.get("kind") != want_kind:
        problems.append(f"reference.kind is {got.get('kind')!r}: {reference.KINDS.get(got.get('kind'), 'unknown')}; "
                        f"{g.stage.name} declares {want_kind!r}")
    if want and got.get("sha256") != want:
        problems.append(f"reference.sha256 {str(got.get('sha256'))[:12]} is not the sha256 of the {start.upper()} "
                        f"final's adapter on disk ({want[:12]})")
    if got.get("equals_sft_final") is not True:
        problems.append(f"reference.equals_sft_final is {got.get('equals_sft_final')!r}")
    return g.result("reference", problems, f"the {want_kind} reference hashes to {start_dir}/"
                    f"{reference.ADAPTER_FILE} as it is on disk now ({str(want)[:12]})", start_dir)


def _field(doc: dict, dotted: str):
    """doc["a"]["b"] for "a.b", or ABSENT."""
    parent, _, key = dotted.partition(".")
    section = doc.get(parent)
    return section.get(key, ABSENT) if isinstance(section, dict) else ABSENT


def _small_batches(attempts, min_batch: int) -> list | None:
    """Batch attempts with per_device < min_batch (None: not a non-empty list of attempts)."""
    if not isinstance(attempts, list) or not attempts:
        return None
    return [a for a in attempts if not (isinstance(a, dict) and isinstance(a.get("per_device"), int)
                                        and a["per_device"] >= min_batch)]


def check_invariants(g, doc):
    """What the trainer must have held to: fp16 trains fp32 adapters, one live model, and for a method with a
    minimum batch (KTO: Method.min_batch=2) every batch attempt at least that big."""
    name, min_batch = g.stage.name, g.stage.method.min_batch if g.stage.method else 1
    fields = INVARIANT_FIELDS + (("batch.attempts",) if min_batch > 1 else ())
    got = {f: _field(doc, f) for f in fields}
    problems = [f"{g.rel} records no {f} (evidence older than the field: re-run the stage)"
                for f, v in got.items() if v is ABSENT]
    dtype, trainable, live = (got[f] for f in INVARIANT_FIELDS)
    if dtype == "fp16" and trainable is not ABSENT and trainable != "float32":
        problems.append(f"precision.trainable_dtype is {trainable!r} under fp16: GradScaler unscales "
                        "float32 gradients only, so the adapters must train in float32")
    if live is not ABSENT and not (isinstance(live, int) and live <= 1):
        problems.append(f"memory.max_live_models is {live!r}: more than one model was alive at once (a leak)")
    if min_batch > 1 and got["batch.attempts"] is not ABSENT:
        small = _small_batches(got["batch.attempts"], min_batch)
        if small is None:
            problems.append(f"batch.attempts is {got['batch.attempts']!r}, expected the list of batch attempts")
        elif small:
            problems.append(f"batch.attempts with per_device < {min_batch}: {small[:3]}; {name} declares "
                            f"min_batch={min_batch} (KTO's KL term pairs the samples of a device batch, with 1 "
                            "it is the implied reward: trl/trainer/kto_trainer.py:846)")
    ok = f"trainables {trainable} under {dtype}, at most {live} live model(s)"
    ok += f", every {name.upper()} batch >= {min_batch}" if min_batch > 1 else ""
    return g.result("invariants", problems, ok)

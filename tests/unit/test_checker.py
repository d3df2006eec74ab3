"""The strict gate on synthetic evidence: a passing run, each tamper caught by the right check, restore passes again.

The checkpoint probe (load + generate) is replaced by a fake here; the real one runs in the e2e tests.
"""
import io
import json
import os
import shutil

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pipeline import day1, engine, reference, training_checks  # noqa: E402
from pipeline import loglik as LL  # noqa: E402
from pipeline.readiness import ARTIFACTS, READINESS, thesis_readiness  # noqa: E402
from pipeline import gate as G  # noqa: E402
from pipeline import evidence as ev  # noqa: E402
from pipeline.settings import load_config  # noqa: E402
from pipeline.stages import REGISTRY  # noqa: E402

SFT = "checkpoints/layer_b/tiny_sft/final"
# every method the registry has (the CONTRACT paths of the four first ones are pinned in tests/e2e/test_day1.py)
FINALS = {m: REGISTRY[m].method.checkpoint.format(slug="tiny") + "/final" for m in REGISTRY.methods}
METRICS = {m: REGISTRY[m].evidence_path.format(slug="tiny") for m in REGISTRY.methods}
assert FINALS["sft"] == SFT and METRICS["kto"] == "reports/training/kto_metrics.json"


def common(cfg, stage, **fields):
    fp, inputs = engine.fingerprint(REGISTRY[stage], cfg, REGISTRY)
    doc = {"stage": stage, "status": "ok", "skipped": False, "reason": None, "started_at": "2025-01-01T00:00:00+00:00",
           "finished_at": "2025-01-01T00:01:00+00:00", "duration_s": 60.0, "git_commit": None,
           "config_hash": "0" * 64, "fingerprint": fp, "versions": {}, "inputs": inputs, "outputs": {},
           "model_tier": cfg.tier}
    return {**doc, **fields}


def write(root, cfg, stage, doc):
    ev.atomic_write_json(root / REGISTRY[stage].evidence(cfg), doc)


def fake_base(cfg) -> str:
    """A stand-in tiny base folder that build_tiny takes as built (its manifest verifies): no model is built."""
    from pipeline import model_build, models
    folder = models.cached_model_dir("tiny", cfg.cache_dir, cfg.model.tiny_seed)
    if (folder / "tiny_build.json").is_file():
        return str(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (folder / "tiny_build.json").write_text(json.dumps(model_build._manifest(folder, seed=cfg.model.tiny_seed)))
    return str(folder)


def train(root, cfg, stage, seed=0):
    """A fake final checkpoint with the trainer's own log, and metrics that describe it honestly."""
    from pipeline import models
    final = root / FINALS[stage]
    shutil.rmtree(final, ignore_errors=True)
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "tiny"}))
    save_file({"base_model.model.lm_head.lora_A.weight": np.full((2, 4), seed, dtype=np.float32)},
              str(final / "adapter_model.safetensors"))
    plan = getattr(cfg, stage)
    curve = [[s, round(3.0 - 0.15 * s, 4)] for s in range(1, plan.max_steps + 1)]
    state = {"global_step": plan.max_steps, "max_steps": plan.max_steps,
             "log_history": [{"step": s, "loss": v, "learning_rate": 1e-3} for s, v in curve] + [{"step": plan.max_steps, "eval_loss": 2.0}]}
    (final / "trainer_state.json").write_text(json.dumps(state))
    files = ev.sha256_tree(final)
    doc = common(cfg, stage, outputs=ev.hash_paths(root, [FINALS[stage]]), model_name="tiny",
                 base_model=".cache/tiny-seed0", base_model_identity=models.base_model_identity(fake_base(cfg)),
                 global_step=plan.max_steps,
                 planned_max_steps=plan.max_steps, loss_curve=curve, eval_loss_curve=[[plan.max_steps, 2.0]],
                 curriculum=[{"max_length": c["max_length"], "planned_step": c["until_step"], "reached_step": c["until_step"]}
                             for c in plan.curriculum],
                 checkpoint_dir=FINALS[stage], checkpoint_files=files, checkpoint_sha256=ev.sha256_json(files),
                 trainer_state_file=f"{FINALS[stage]}/trainer_state.json", trainer_state_sha256=files["trainer_state.json"],
                 precision={"dtype": "fp32", "quantization": None, "attn_implementation": "sdpa", "device": "cpu",
                            "trainable_dtype": "float32"},
                 memory={"max_live_models": 1, "peak_gb": 0.1, "peak_kind": "rss", "estimate_gb": None},
                 batch={"requested": {"per_device": 2, "grad_acc": 4},
                        "attempts": [{"attempt": 1, "per_device": 2, "grad_acc": 4, "reason": "requested"}]},
                 oom_retries=[], peak_mem_gb=0.1, tokens_per_s=100.0)
    doc["data"] = {"rows": 96}
    if stage == "sft":
        doc.update(chat_template={"sha256": "0" * 64}, lora={"r": 8})
    else:
        doc["start_checkpoint"] = {"dir": SFT, "checkpoint_sha256": ev.sha256_json(ev.sha256_tree(root / SFT))}
        if REGISTRY[stage].method.reference != "none":   # what pipeline.reference records at train begin
            doc["reference"] = {"kind": REGISTRY[stage].method.reference, "equals_sft_final": True,
                                "sha256": reference.saved_adapter_sha256(root / SFT), "tensors": 1}
        doc.update(final_reward_metrics={"rewards/margins": 0.1}, reward_curves={"rewards/margins": [[1, 0.0], [2, 0.1]]})
    write(root, cfg, stage, doc)
    return doc


def loglik_item(row, i):
    """A loglik per-item record as pipeline.loglik.record writes it; the gold option most likely on every third."""
    from pipeline import evalsets
    choices = list(row["options"])
    gold = choices.index(row["answer"])
    lls = [-1.0 - j for j in range(len(choices))]
    lls[gold] = 0.0 if i % 3 == 0 else -5.0
    item = {"id": row["id"], "set": row["set"], "subject": row["subject"], "task": evalsets.of(row).lm_eval_task(row),
            "doc_id": i, "choices": choices, "target": gold, "gold": row["answer"], "loglik": lls,
            "is_greedy": [False] * len(choices), **({} if row["set"] == "pubmedqa" else {"acc_norm": None}),
            "prompt_sha256": "0" * 64, "doc_hash": "0" * 64, "continuations": [" " + c for c in choices]}
    scored = LL.rescore_item(item)
    return item | scored | {"raw": scored["extracted"], "method": "loglik", "correct": scored["acc"] == 1.0}


def eval_doc(root, cfg):
    """Predictions on the bundled questions written like the eval stage writes them, and every figure computed
    from them with the stage's own functions (the gate's eval.numbers recomputes them)."""
    from pipeline.stages import eval as E
    from pipeline.variants import decoding
    picked = E.load_sets(cfg)
    sets = {s: {"planned_n": len(rows), "question_ids": [r["id"] for r in rows], "full_size": full,
                "seed": cfg.eval.seed} for s, (rows, full) in picked.items()}
    variants = {"base": {"status": "scored", "reason": None, "checkpoint_dir": None, "checkpoint_sha256": None}}
    for st, final in FINALS.items():
        sha = (ev.read_json(root / METRICS[st]) or {}).get("checkpoint_sha256")
        variants[st] = ({"status": "scored", "reason": None, "checkpoint_dir": final, "checkpoint_sha256": sha} if sha else
                        {"status": "skipped", "reason": f"{st} was not trained", "checkpoint_dir": None, "checkpoint_sha256": None})
    preds, ll_preds, outputs = {}, {}, {}
    for k, (v, entry) in enumerate(variants.items()):
        if entry["status"] != "scored":
            continue
        rows = [r for rs, _ in picked.values() for r in rs]
        preds[v] = []
        for i, row in enumerate(rows):   # right on every other question, shifted per variant
            raw = f"The answer is {row['answer']}." if (i + k) % 2 else "I am not sure."
            extracted, method = E.extract(row, raw)
            preds[v].append({"id": row["id"], "set": row["set"], "subject": row["subject"], "prompt_sha256": "0" * 64,
                             "raw": raw, "extracted": extracted, "gold": row["answer"],
                             "correct": extracted == row["answer"], "method": method})
        ll_preds[v] = [loglik_item(row, i + k) for i, row in enumerate(rows)]
        for rel, items in ((f"reports/eval/predictions/{v}.jsonl", preds[v]),
                           (LL.PREDICTIONS.format(variant=v), ll_preds[v])):
            ev.atomic_write_text(root / rel, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in items))
            outputs[rel] = ev.sha256_file(root / rel)
    return common(cfg, "eval", variants=variants, sets=sets, results={v: E.summarize(ps, cfg) for v, ps in preds.items()},
                  results_loglik={v: LL.summarize(ps, cfg) for v, ps in ll_preds.items()},
                  protocols={"results": "generative_letter", "results_loglik": "loglik"},
                  loglik={"protocol": "loglik", "harness": "lm-eval", "lm_eval": "0.4.13", "num_fewshot": 0,
                          "chat_template": False, "tasks": {}, "predictions": LL.PREDICTIONS, "seconds": {}},
                  paired=E.paired_tests(preds, cfg, REGISTRY.aligned)
                  + E.paired_tests(ll_preds, cfg, REGISTRY.aligned, protocol="loglik"), batch_size=8, max_new_tokens=8,
                  n_bootstrap=cfg.eval.n_bootstrap, outputs=outputs,
                  fallback={"enabled": False, "available": False, "reason": "off"},
                  generation={"backend": "hf", "decoding": decoding(8)},
                  memory={"max_live_models": 1, "base_loads": 1}, min_detectable_difference=E.power(picked),
                  multiple_comparisons={"method": "holm", "alpha": 0.05, "family": "f", "protocols": []})


def judge_doc(cfg, risk=(10, 10), root=None):
    """The risk judge's records (judged first, then unjudged) and answers written like the judge stage writes
    them, and the summary computed from them with its own functions (the gate recomputes them)."""
    from pipeline.stages import judge as J
    ids = [f"sft-{i}" for i in range(risk[0])]
    records = [{"kind": "risk", "question_id": q, "variant": "sft", "status": "judged" if i < risk[1] else "unjudged",
                "verdict": {"level": "low", "categories": [], "explanation": "fine"} if i < risk[1] else None}
               for i, q in enumerate(ids)]
    items = [{"question_id": q, "variant": "sft"} for q in ids]
    files = {"reports/judge/judgments.jsonl": records,
             "reports/judge/answers/sft.jsonl": [{"question_id": q, "variant": "sft", "answer": "ok"} for q in ids]}
    outputs = {}
    for rel, rows in files.items():
        if root is not None:
            ev.atomic_write_text(root / rel, "".join(json.dumps(r) + "\n" for r in rows))
            outputs[rel] = ev.sha256_file(root / rel)
    return common(cfg, "judge", min_coverage=0.9, question_ids=ids, judge_model="gpt-4o-mini",
                  prompt_versions={"risk": "abc"}, outputs=outputs, answers={"sft": "reports/judge/answers/sft.jsonl"},
                  pairwise={"enabled": False, "planned": 0, "judged": 0, "coverage": None},
                  risk=J.coverage(risk[0], risk[1]) | J.risk_summary(items, {"results": records}))


def build_run(root, cfg, force_skip=False):
    write(root, cfg, "gpu_check", common(cfg, "gpu_check", plan={"device": "cpu"}))
    for name, why in (("download", "the base model is local (the tiny tier builds it): nothing to download"),
                      ("preflight", "not asked for on the tiny tier")):
        write(root, cfg, name, common(cfg, name, status="skipped", skipped=True, reason_code="not_requested",
                                      reason=why, config_read=[]))
    for i, stage in enumerate(FINALS):
        if force_skip:
            write(root, cfg, stage, common(cfg, stage, status="skipped", skipped=True, reason_code="skip_forced",
                                           reason="FORCE_SKIP_TRAINING=true: training skipped on request"))
        else:
            train(root, cfg, stage, seed=i)
    write(root, cfg, "eval", eval_doc(root, cfg))
    write(root, cfg, "judge", judge_doc(cfg, root=root))
    write(root, cfg, "reports", common(cfg, "reports"))
    write(root, cfg, "seeds", common(cfg, "seeds", status="skipped", skipped=True, reason_code="not_requested",
                                     reason="no extra seeds (SEEDS is empty)", config_read=[]))
    requote(root)


def requote(root):
    """The reports stage quotes the evidence root (pipeline/root_hash.py) of the evidence as it is."""
    from pipeline import root_hash
    ev.atomic_write_json(root / "reports/thesis_support/experiment_record.json",
                         {"evidence_root": root_hash.of_root(root, REGISTRY)})


@pytest.fixture
def probes(monkeypatch):
    calls = []

    def fake(vs, base, adapter_dir):
        calls.append((base, str(adapter_dir), vs.plan["device"]))
        return True, " the heart"
    monkeypatch.setattr(training_checks, "probe_checkpoint", fake)
    return calls


@pytest.fixture
def run(tmp_path, probes):
    root = tmp_path / "out"
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root), "ENABLE_LLM_RISK_JUDGE": "true"})
    build_run(root, cfg)
    backup = tmp_path / "backup"
    shutil.copytree(root, backup)
    return root, cfg, backup


def restore(root, backup):
    shutil.rmtree(root)
    shutil.copytree(backup, root)


def test_honest_run_passes_and_probes_each_final_on_its_base(run, probes):
    root, cfg, _ = run
    gate = G.evaluate(cfg)
    assert gate["strict_pass"], [c for c in gate["checks"] if not c["passed"]]
    ids = {c["id"] for c in gate["checks"]}
    assert {"sft.metrics", "sft.checkpoint", "sft.loads", "sft.curve", "sft.steps", "dpo.from_sft", "kto.from_sft",
            "eval.coverage", "judge.pairwise", "judge.risk", "chain.no_incomplete", "chain.fresh", "chain.stages"} <= ids
    assert sorted(p[1] for p in probes) == sorted(str(root / f) for f in FINALS.values())
    assert all(p[0] == str(root / ".cache" / "tiny-seed0") and p[2] == "cpu" for p in probes)
    loads = next(c for c in gate["checks"] if c["id"] == "sft.loads")
    assert "the heart" in loads["detail"]


def _edit_json(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def skipped_edited_to_not_skipped(root, cfg):
    write(root, cfg, "simpo", common(cfg, "simpo", status="skipped", skipped=False, reason="no CUDA device"))


def drop_required_field(root, cfg):
    _edit_json(root / METRICS["dpo"], lambda d: d.pop("start_checkpoint"))


def flip_adapter_byte(root, cfg):
    f = root / FINALS["dpo"] / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[10] ^= 0xFF
    f.write_bytes(bytes(data))


def delete_final(root, cfg):
    shutil.rmtree(root / FINALS["kto"])


def replace_sft_after_dpo(root, cfg):
    train(root, cfg, "sft", seed=99)   # a new SFT final with honest metrics; DPO trained on the old one


def copy_dry_run_over_metrics(root, cfg):
    dry = common(cfg, "dry_run", status="dry_run", reason="dry run: nothing trained")
    (root / METRICS["kto"]).write_text(json.dumps(dry))


def edit_loss_curve(root, cfg):
    _edit_json(root / METRICS["sft"], lambda d: d["loss_curve"][-1].__setitem__(1, 0.001))


def edit_trainer_log_to_match(root, cfg):
    state = root / SFT / "trainer_state.json"
    _edit_json(state, lambda d: d["log_history"][-2].__setitem__("loss", 0.001))
    _edit_json(root / METRICS["sft"], lambda d: d["loss_curve"][-1].__setitem__(1, 0.001))


def flat_curve(root, cfg):
    state = root / SFT / "trainer_state.json"
    _edit_json(state, lambda d: [e.__setitem__("loss", 2.0) for e in d["log_history"] if "loss" in e])
    sha = ev.sha256_file(state)

    def fix(d):
        d["loss_curve"] = [[s, 2.0] for s, _ in d["loss_curve"]]
        d["checkpoint_files"]["trainer_state.json"] = d["trainer_state_sha256"] = sha
        d["checkpoint_sha256"] = ev.sha256_json(d["checkpoint_files"])
    _edit_json(root / METRICS["sft"], fix)


def stopped_early(root, cfg):
    _edit_json(root / METRICS["simpo"], lambda d: d.update(global_step=3))


def other_base_model(root, cfg):
    _edit_json(root / METRICS["dpo"], lambda d: d.update(base_model="Qwen/Qwen2.5-7B-Instruct"))


def leftover_marker(root, cfg):
    ev.atomic_write_json(root / "reports/.incomplete/dpo.marker", {"stage": "dpo", "pid": 1})


def eval_missed_a_variant(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d["variants"].__setitem__("kto", {"status": "skipped", "reason": "x"}))


def eval_fewer_questions(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d["results"]["dpo"]["medqa"].update(n=5))


def risk_judge_low_coverage(root, cfg):
    write(root, cfg, "judge", judge_doc(cfg, risk=(10, 5), root=root))


def risk_judge_coverage_inflated(root, cfg):
    _edit_json(root / "reports/judge/judge_summary.json", lambda d: d["risk"].update(judged=5))


def risk_levels_edited(root, cfg):
    _edit_json(root / "reports/judge/judge_summary.json",
               lambda d: d["risk"]["per_variant"]["sft"]["levels"].update(low=0, none=10))


def judge_stage_crashed(root, cfg):
    write(root, cfg, "judge", common(cfg, "judge", status="failed", reason="ConnectionError: endpoint unreachable"))


def evidence_changed_after_the_reports(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d.update(note="edited after the reports"))


def reports_stage_failed(root, cfg):
    write(root, cfg, "reports", common(cfg, "reports", status="failed", reason="KeyError: 'results'"))


def fp16_with_bf16_trainables(root, cfg):
    _edit_json(root / METRICS["sft"], lambda d: d["precision"].update(dtype="fp16", trainable_dtype="bfloat16"))


def two_live_models(root, cfg):
    _edit_json(root / METRICS["dpo"], lambda d: d["memory"].update(max_live_models=2))


def kto_retried_at_batch_one(root, cfg):
    retry = {"attempt": 2, "per_device": 1, "grad_acc": 8, "reason": "CUDA out of memory"}
    _edit_json(root / METRICS["kto"], lambda d: d["batch"]["attempts"].append(retry))


def metrics_without_memory(root, cfg):
    _edit_json(root / METRICS["simpo"], lambda d: d.pop("memory"))


def eval_without_decoding(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d["generation"].pop("decoding"))


def eval_loglik_accuracy_edited(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d["results_loglik"]["sft"]["medqa"].update(accuracy=0.93))


def eval_loglik_item_flipped_and_rehashed(root, cfg):
    """A wrong loglik item marked right (acc 1, its prediction the gold), the file's hash made to match."""
    rel = LL.PREDICTIONS.format(variant="dpo")
    items = [json.loads(x) for x in (root / rel).read_text().splitlines()]
    wrong = next(p for p in items if not p["correct"])
    wrong.update(acc=1.0, correct=True, extracted=wrong["gold"], raw=wrong["gold"])
    (root / rel).write_text("".join(json.dumps(p) + "\n" for p in items))
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d["outputs"].update({rel: ev.sha256_file(root / rel)}))


def eval_without_loglik(root, cfg):
    _edit_json(root / "reports/eval/eval_default.json", lambda d: d.pop("results_loglik"))


@pytest.mark.parametrize("tamper, failing_id", [
    (skipped_edited_to_not_skipped, "simpo.metrics"),
    (drop_required_field, "dpo.metrics"),
    (flip_adapter_byte, "dpo.checkpoint"),
    (delete_final, "kto.checkpoint"),
    (replace_sft_after_dpo, "dpo.from_sft"),
    (copy_dry_run_over_metrics, "kto.metrics"),
    (edit_loss_curve, "sft.curve"),
    (edit_trainer_log_to_match, "sft.curve"),
    (flat_curve, "sft.curve"),
    (stopped_early, "simpo.steps"),
    (other_base_model, "dpo.base_model"),
    (leftover_marker, "chain.no_incomplete"),
    (eval_missed_a_variant, "eval.coverage"),
    (eval_fewer_questions, "eval.coverage"),
    (risk_judge_low_coverage, "judge.risk"),
    (risk_judge_coverage_inflated, "judge.risk"),
    (risk_levels_edited, "judge.risk"),
    (judge_stage_crashed, "judge.pairwise"),   # disabled, but nothing recorded it as disabled
    (reports_stage_failed, "chain.stages"),
    (evidence_changed_after_the_reports, "reports.evidence_root"),
    (fp16_with_bf16_trainables, "sft.invariants"),
    (two_live_models, "dpo.invariants"),
    (kto_retried_at_batch_one, "kto.invariants"),
    (metrics_without_memory, "simpo.invariants"),
    (eval_without_decoding, "eval.coverage"),
    (eval_loglik_accuracy_edited, "eval.numbers"),
    (eval_loglik_item_flipped_and_rehashed, "eval.numbers"),
    (eval_without_loglik, "eval.coverage"),
])
def test_each_tamper_fails_its_check_and_restoring_passes(run, tamper, failing_id):
    root, cfg, backup = run
    tamper(root, cfg)
    gate = G.evaluate(cfg)
    assert not gate["strict_pass"]
    assert failing_id in gate["failed"], gate["failed"]
    restore(root, backup)
    assert G.evaluate(cfg)["strict_pass"]


def test_replaced_sft_keeps_sft_checks_green_and_blames_the_children(run):
    root, cfg, _ = run
    replace_sft_after_dpo(root, cfg)
    failed = G.evaluate(cfg)["failed"]
    assert {"dpo.from_sft", "simpo.from_sft", "kto.from_sft"} <= set(failed)
    assert "sft.checkpoint" not in failed and "sft.curve" not in failed


def test_a_probe_that_cannot_generate_fails_loads_with_its_error(run, monkeypatch):
    root, cfg, _ = run
    monkeypatch.setattr(training_checks, "probe_checkpoint", lambda vs, base, adapter: (False, "OSError: no config.json"))
    gate = G.evaluate(cfg)
    loads = next(c for c in gate["checks"] if c["id"] == "kto.loads")
    assert not loads["passed"] and "no config.json" in loads["detail"]


def test_force_skip_fails_the_gate_with_the_skip_reason_and_advice(tmp_path, probes):
    root = tmp_path / "out"
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)})
    build_run(root, cfg, force_skip=True)
    rc = G.main(cfg, Console(file=io.StringIO()))
    gate = json.loads((root / G.GATE).read_text())
    assert rc == 1 and gate["strict_pass"] is False
    metrics = next(c for c in gate["checks"] if c["id"] == "sft.metrics")
    assert "FORCE_SKIP_TRAINING=true" in metrics["detail"] and "unset" in metrics["todo"]
    assert next(c for c in gate["checks"] if c["id"] == "sft.checkpoint")["blocked_by"] == "sft.metrics"
    assert probes == []   # nothing to load: no checkpoint was probed
    assert "eval.coverage" in gate["failed"]
    md = (root / "reports/migration/gpu_completion_check.md").read_text()
    assert md.index("sft.metrics") < md.index("## Passing")


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_main_writes_both_verdicts_and_never_reads_an_old_one(run):
    root, cfg, _ = run
    assert G.main(cfg, Console(file=io.StringIO())) == 0
    delete_final(root, cfg)
    # a forged earlier verdict must not matter
    ev.atomic_write_json(root / G.GATE, {"strict_pass": True, "failed": [], "checks": []})
    assert G.main(cfg, Console(file=io.StringIO())) == 1
    gate = json.loads((root / G.GATE).read_text())
    assert gate["strict_pass"] is False and "kto.checkpoint" in gate["failed"]
    md = (root / "reports/migration/gpu_completion_check.md").read_text()
    assert md.index("kto.checkpoint") < md.index("## Passing") and "what to do" in md
    readiness = json.loads((root / READINESS).read_text())
    assert readiness["ready_for_writing"] is False
    assert (root / "reports/thesis_support/thesis_readiness.md").is_file()


def _thesis_artifacts(root):
    for rel in ARTIFACTS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / "reports/figures").mkdir(parents=True, exist_ok=True)
    (root / "reports/figures/sft_loss.png").write_bytes(b"\x89PNG")


def _full_size_eval(root, cfg):
    sets = {s: {"planned_n": 100, "question_ids": list(range(100)), "full_size": 100} for s in cfg.eval.sets}
    ev.atomic_write_json(root / "reports/eval/eval_default.json", {"status": "ok", "sets": sets})


@pytest.mark.parametrize("tier", ["tiny", "demo"])
def test_smoke_tiers_are_never_ready_for_writing(tmp_path, tier):
    cfg = load_config(tier=tier, env={"PIPELINE_ROOT": str(tmp_path)})
    _thesis_artifacts(tmp_path)
    _full_size_eval(tmp_path, cfg)
    r = thesis_readiness(cfg, strict_pass=True)
    assert r["ready_for_writing"] is False
    assert r["blockers"] == [f"tier {tier} is a smoke tier: never ready for writing (use MODEL_TIER=7b or 14b on a GPU)"]


def test_a_complete_7b_run_is_ready_and_each_gap_is_a_blocker(tmp_path):
    cfg = load_config(tier="7b", env={"PIPELINE_ROOT": str(tmp_path)})
    _thesis_artifacts(tmp_path)
    _full_size_eval(tmp_path, cfg)
    assert thesis_readiness(cfg, strict_pass=True)["ready_for_writing"] is True
    assert not thesis_readiness(cfg, strict_pass=False)["ready_for_writing"]
    (tmp_path / "reports/figures/sft_loss.png").unlink()
    (tmp_path / "reports/sota_compare.md").unlink()
    _edit_json(tmp_path / "reports/eval/eval_default.json", lambda d: d["sets"]["medqa"].update(planned_n=50))
    blockers = " ".join(thesis_readiness(cfg, strict_pass=True)["blockers"])
    assert "reports/sota_compare.md" in blockers and "reports/figures/*.png" in blockers and "medqa (50 of 100)" in blockers


def test_keys_warns_per_enabled_flag_and_never_prints_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    monkeypatch.setenv("ENABLE_LLM_JUDGE", "true")
    monkeypatch.setenv("ENABLE_LLM_RISK_JUDGE", "true")
    monkeypatch.setenv("ENABLE_V2_LLM_FALLBACK", "false")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-do-not-print")
    assert day1.cli(["keys"]) == 0
    assert "sk-test-do-not-print" not in capsys.readouterr().out
    monkeypatch.setenv("OPENAI_API_KEY", "")
    assert day1.cli(["keys"]) == 3
    out = capsys.readouterr().out
    assert "ENABLE_LLM_JUDGE=true will fail" in out and "ENABLE_LLM_RISK_JUDGE=true will fail" in out
    assert "ENABLE_V2_LLM_FALLBACK" not in out
    monkeypatch.setenv("ENABLE_LLM_JUDGE", "maybe")
    assert day1.cli(["keys"]) == 2


def _steps(tmp_path, rows):
    """Step records as day1_run.sh writes them: one JSON object per line."""
    f = tmp_path / "steps.jsonl"
    keys = ("name", "status", "rc", "seconds", "log", "note")
    f.write_text("".join(json.dumps(dict(zip(keys, r))) + "\n" for r in rows))
    return f


def test_dry_run_summary_says_nothing_was_trained(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    steps = _steps(tmp_path, [("gpu-check", "ok", 0, 3, "day1_gpu-check.log", ""),
                              ("dry-run", "ok", 0, 9, "day1_dry-run.log", "")])
    assert day1.cli(["summary", str(steps), "--dry-run"]) == 0
    s = json.loads((tmp_path / day1.SUMMARY).read_text())
    assert s["trained"] is False and "nothing was trained" in s["verdict"] and "passed" in s["verdict"]
    assert s["steps"][1]["log"] == "reports/logs/day1_dry-run.log"
    assert "nothing was trained" in (tmp_path / "reports/migration/day1_run_summary.md").read_text()


def test_summary_takes_the_verdict_from_the_gate_step_and_lists_first_fixes(run, monkeypatch):
    root, cfg, _ = run
    delete_final(root, cfg)
    G.main(cfg, Console(file=io.StringIO()))
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    steps = _steps(root, [("gpu-run", "ok", 0, 100, "day1_gpu-run.log", ""),
                          ("gpu-complete-check", "failed", 1, 5, "day1_gpu-complete-check.log", "")])
    day1.cli(["summary", str(steps)])
    s = json.loads((root / day1.SUMMARY).read_text())
    assert s["gate"]["strict_pass"] is False and s["verdict"] == "strict_pass: false"
    assert any(f.startswith("kto.checkpoint") for f in s["first_fixes"])
    assert s["thesis_readiness"]["ready_for_writing"] is False


def test_summary_ignores_a_gate_report_older_than_this_run(run, monkeypatch):
    root, cfg, _ = run
    G.main(cfg, Console(file=io.StringIO()))            # an earlier verdict on disk
    os.utime(root / G.GATE, (1, 1))
    (root / "reports/logs").mkdir(parents=True, exist_ok=True)
    (root / "reports/logs/day1_gpu-run.log").write_text("failed sft: boom\n")
    (root / "reports/logs/day1_gpu-complete-check.log").write_text("Traceback ...\nKeyError: 'x'\n")
    monkeypatch.setenv("PIPELINE_ROOT", str(root))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    steps = _steps(root, [("gpu-run", "failed", 2, 100, "day1_gpu-run.log", ""),
                          ("gpu-complete-check", "failed", 2, 5, "day1_gpu-complete-check.log", "")])
    day1.cli(["summary", str(steps)])
    s = json.loads((root / day1.SUMMARY).read_text())
    assert s["gate"]["failed"] == [] and s["gate"]["strict_pass"] is False
    assert any("failed sft: boom" in f for f in s["first_fixes"]) and any("did it crash" in f for f in s["first_fixes"])


@pytest.mark.parametrize("stage, edit, says", [
    ("sft", lambda d: d["memory"].update(max_live_models=None), "memory.max_live_models is None"),
    ("dpo", lambda d: d["precision"].pop("trainable_dtype"), "records no precision.trainable_dtype"),
    ("simpo", lambda d: d["memory"].pop("max_live_models"), "records no memory.max_live_models"),
    ("kto", lambda d: d.pop("batch"), "records no batch.attempts"),
    ("kto", lambda d: d["batch"]["attempts"][0].update(per_device=1), "per_device < 2"),
    ("sft", lambda d: d["precision"].update(dtype="fp16", trainable_dtype="mixed: bfloat16, float32"),
     "'mixed: bfloat16, float32' under fp16"),
])
def test_invariants_name_the_missing_field_or_the_broken_rule(run, stage, edit, says):
    root, cfg, _ = run
    _edit_json(root / METRICS[stage], edit)
    gate = G.evaluate(cfg)
    check = next(c for c in gate["checks"] if c["id"] == f"{stage}.invariants")
    assert not check["passed"] and says in check["detail"], check["detail"]
    assert check["todo"].startswith("the metrics predate these fields, or the trainer broke an invariant")
    # (the metrics schema may say so too; the reports quote the evidence root of the metrics before the edit)
    assert {f.split(".")[0] for f in gate["failed"]} - {"reports"} == {stage}


def test_invariants_pass_for_fp16_with_float32_trainables_and_report_them(run):
    root, cfg, _ = run
    _edit_json(root / METRICS["sft"], lambda d: d["precision"].update(dtype="fp16", trainable_dtype="float32"))
    requote(root)   # a run that trained so: its reports quote these metrics
    gate = G.evaluate(cfg)
    assert gate["strict_pass"], gate["failed"]
    detail = next(c["detail"] for c in gate["checks"] if c["id"] == "kto.invariants")
    assert "float32" in detail and "every KTO batch >= 2" in detail


def test_the_gate_records_how_many_models_its_probes_held(run, probes):
    root, cfg, _ = run
    G.main(cfg, Console(file=io.StringIO()))
    gate = json.loads((root / G.GATE).read_text())
    assert gate["max_live_models"] == 0 and gate["base_loads"] == 0   # the fake probes load nothing
    assert len(probes) == len(REGISTRY.methods)   # one probe per final


def _rehearsal_gpu_check(root, cfg):
    _edit_json(root / "reports/migration/gpu_check.json",
               lambda d: d.update(rehearsal={"probe_file": "configs/probes/a100_80g.json", "stand_in": "tiny"}))


def test_a_rehearsal_passes_strict_but_is_never_ready_for_writing(run, tmp_path):
    root, cfg, _ = run
    _rehearsal_gpu_check(root, cfg)
    assert G.evaluate(cfg)["strict_pass"]                  # a normal Day-1 for the gate
    cfg7 = load_config(tier="7b", env={"PIPELINE_ROOT": str(tmp_path / "7b")})
    _thesis_artifacts(tmp_path / "7b")
    _full_size_eval(tmp_path / "7b", cfg7)
    assert thesis_readiness(cfg7, strict_pass=True)["ready_for_writing"] is True
    write(tmp_path / "7b", cfg7, "gpu_check", common(cfg7, "gpu_check", plan={"device": "cpu"}))
    _rehearsal_gpu_check(tmp_path / "7b", cfg7)
    r = thesis_readiness(cfg7, strict_pass=True)
    assert r["ready_for_writing"] is False and r["blockers"] == ["rehearsal: the weights were a stand-in"]
    assert r["rehearsal"] == ["reports/migration/gpu_check.json"]


def test_a_rehearsal_flag_in_any_training_metrics_blocks_writing(tmp_path):
    cfg = load_config(tier="14b", env={"PIPELINE_ROOT": str(tmp_path)})
    _thesis_artifacts(tmp_path)
    _full_size_eval(tmp_path, cfg)
    write(tmp_path, cfg, "kto", common(cfg, "kto", rehearsal={"steps": 6}))
    r = thesis_readiness(cfg, strict_pass=True)
    assert r["blockers"] == ["rehearsal: the weights were a stand-in"] and r["rehearsal"] == [METRICS["kto"]]


def test_a_rehearsal_is_probed_on_the_plan_it_ran_against_its_stand_in(tmp_path):
    """gpu_check's plan is the GPU's (cuda); the rehearsal ran run_plan (cpu, the tier's precision and nf4)
    on the tiny stand-in, which is the base the gate expects."""
    from pipeline import models
    cfg = load_config(tier="14b", env={"PIPELINE_ROOT": str(tmp_path), "REHEARSAL": "true",
                                       "GPU_PROBE_FILE": "configs/probes/a100_40g.json"})
    gpu = {"device": "cuda", "precision": "bf16", "attn_implementation": "flash_attention_2", "quantization": "nf4"}
    write(tmp_path, cfg, "gpu_check", common(cfg, "gpu_check", plan=gpu, rehearsal={"differences": ["cpu"]},
                                             run_plan=dict(gpu, device="cpu", attn_implementation="sdpa",
                                                           rehearsal=True)))
    assert G.probe_plan(tmp_path) == {"device": "cpu", "precision": "bf16", "attn_implementation": "sdpa",
                                            "quantization": "nf4", "rehearsal": True}
    stand_in = fake_base(cfg)
    g = G.Gate(cfg, REGISTRY, G.probe_plan(tmp_path)).of(REGISTRY["dpo"])
    check = training_checks.check_base(g, {"base_model": ".cache/tiny-seed0",
                                           "base_model_identity": models.base_model_identity(stand_in)})
    assert check.passed and check.evidence == "reports/training/dpo_metrics.json", check.detail


# --- advice keyed by code; the registry is the only list of methods -----------------------------------------
def test_a_failed_check_gets_the_advice_of_its_code_not_of_words_in_its_reason(run):
    root, cfg, _ = run
    write(root, cfg, "sft", common(cfg, "sft", status="skipped", skipped=True, reason_code="no_cuda",
                                   reason="hardware plan: the words FORCE_SKIP_TRAINING and memory mean nothing here"))
    gate = G.evaluate(cfg)
    checks = {c["id"]: c for c in gate["checks"]}
    sft = checks["sft.metrics"]
    assert not sft["passed"] and sft["code"] == "no_cuda"
    assert sft["todo"] == G.ADVICE["no_cuda"].format(var="MIN_CUDA_MEM_GB_7B")
    assert checks["sft.checkpoint"]["todo"] == "fix sft.metrics first"
    # eval scored an SFT final whose metrics are no longer ok: no code of its own, so its failure is upstream's
    assert not checks["eval.coverage"]["passed"] and "code" not in checks["eval.coverage"]
    assert checks["eval.coverage"]["todo"] == G.ADVICE["upstream_failed"].format(upstream="sft")


@pytest.mark.parametrize("code", ["skip_forced", "oom", "too_little_memory", "undeclared_read", "infeasible_plan"])
def test_advice_is_a_table_keyed_by_code(code):
    cfg = load_config(tier="14b", env={})
    check = {"id": "kto.metrics", "passed": False, "detail": "CUDA memory feasible FORCE_SKIP_TRAINING", "code": code}
    assert G.advice(cfg, check) == G.ADVICE[code].format(stage="kto", var="MIN_CUDA_MEM_GB_14B")
    assert G.advice(cfg, dict(check, code=None)) == G.ADVICE["metrics"].format(stage="kto")


def test_the_engine_records_the_code_a_stage_raised(tmp_path):
    from pipeline.core import Registry, SkipStage, Stage

    def skip(ctx):
        raise SkipStage("no GPU here", code="no_cuda")
    reg = Registry([Stage("probe", "reports/probe.json", run=skip, schema="_common")])
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(tmp_path)})
    engine.run_stage(reg["probe"], cfg, Console(file=io.StringIO()), reg)
    doc = ev.read_json(tmp_path / "reports/probe.json")
    assert doc["status"] == "skipped" and doc["reason_code"] == "no_cuda"


def test_a_method_added_to_the_registry_gets_every_training_check(run, monkeypatch):
    """A new method in a fake registry: the gate asks the shared training checks for it (nothing heavy runs:
    its metrics are missing, so everything after metrics is blocked), including from_<start>."""
    from pipeline.core import Method, Registry, Stage
    root, cfg, _ = run
    new = Stage("newmethod", "reports/training/newmethod_metrics.json", needs=("sft",), training=True,
                method=Method("checkpoints/newmethod-real-baseline", trainer="NewTrainer", reference="none"))
    fake = Registry([REGISTRY["gpu_check"], REGISTRY["sft"], new])
    asked, shared = [], training_checks.checks

    def spy(g, doc):
        asked.append(g.stage.name)
        return shared(g, doc)
    monkeypatch.setattr(training_checks, "checks", spy)
    gate = G.evaluate(cfg, registry=fake)
    ids = [c["id"] for c in gate["checks"]]
    assert asked == ["newmethod"]   # sft brings its own (the same shared function, bound at import)
    kinds = ["metrics", "checkpoint", "loads", "curve", "steps", "base_model", "invariants"]
    assert [i for i in ids if i.startswith("newmethod.")] == [f"newmethod.{k}" for k in kinds + ["from_sft"]]
    assert [i for i in ids if i.startswith("sft.")] == [f"sft.{k}" for k in kinds]
    assert gate["failed"][0] == "newmethod.metrics"
    assert "newmethod_metrics.json is missing" in gate["checks"][7]["detail"]
    blocked = {c["id"]: c["blocked_by"] for c in gate["checks"] if c.get("blocked_by")}
    assert blocked == {f"newmethod.{k}": "newmethod.metrics" for k in kinds[1:] + ["from_sft"]}
    assert fake.methods == ("sft", "newmethod")

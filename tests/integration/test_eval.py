"""The eval and reports stages on the tiny tier (CPU), end to end on a temp PIPELINE_ROOT.

Trains SFT, DPO and SimPO once (few steps), marks KTO as skipped, then evaluates: predictions written,
the same question ids for every variant, CIs present, the skipped variant listed and never scored;
the reports stage writes every file and refuses a published number without a citation.
Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest tests/integration/test_eval.py -x -q
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from pipeline.stages import REGISTRY
from pipeline import evidence as ev
from pipeline.__main__ import main

# short training: this module tests what eval makes of checkpoints, not the trainers
ARGS = ["sft.curriculum=[]", "sft.max_steps=4", "dpo.max_steps=2", "simpo.max_steps=2",
        "eval.sample_sizes={medqa: 4, pubmedqa: 3, cmmlu: 5}", "eval.n_bootstrap=200",
        "eval.free_answer=true", "eval.free_answer_max_new_tokens=12"]   # the third protocol, base only
CLEARED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ENABLE_LLM_JUDGE", "FORCE_SKIP_TRAINING", "ENABLE_V2_LLM_FALLBACK",
           "MODEL_NAME", "SEED", "BATCH_SIZE", "GRAD_ACC", "JUDGE_MODEL")
KTO_SKIP = "test: KTO training was skipped on purpose"
BASE_LOADS: list[str] = []     # the paths models.load_model was called with during the eval stage


def run_stage(name: str, force: bool = False) -> str:
    """One stage without its needs (KTO's skipped evidence must stay as written)."""
    from rich.console import Console
    from pipeline import engine
    from pipeline.settings import load_config
    return engine.run_stage(REGISTRY[name], load_config(overrides=ARGS), Console(), REGISTRY, force=force)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    for var in CLEARED:
        mp.delenv(var, raising=False)
    mp.setenv("MEDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "medllm-cache"))   # the tiny model, built once
    for k, v in {"PIPELINE_ROOT": str(root), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1",
                 "ENABLE_LLM_RISK_JUDGE": "false"}.items():
        mp.setenv(k, v)
    from pipeline import settings
    mp.setattr(settings, "environment", functools.partial(settings.environment, dotenv_path=root / ".env"))
    assert main(["run", "sft", "dpo", "simpo", *ARGS]) == 0
    for stage in (m for m in REGISTRY.methods if m not in ("sft", "dpo", "simpo")):   # kto, and any later method
        ev.atomic_write_json(root / REGISTRY[stage].evidence_path.format(slug="tiny"),
                             {"stage": stage, "status": "skipped", "skipped": True, "reason": KTO_SKIP})
    from pipeline import models
    load = models.load_model
    mp.setattr(models, "load_model", lambda path, *a, **k: BASE_LOADS.append(str(path)) or load(path, *a, **k))
    assert run_stage("eval") == "ok"
    mp.setattr(models, "load_model", load)
    yield root
    mp.undo()


def doc(root: Path) -> dict:
    return json.loads((root / "reports/eval/eval_default.json").read_text())


def test_every_scored_variant_answers_the_same_recorded_questions(evaluated):
    d = doc(evaluated)
    assert ev.validate("eval", d) == []
    assert {v for v, e in d["variants"].items() if e["status"] == "scored"} == {"base", "sft", "dpo", "simpo"}
    sets = d["sets"]
    assert {s: i["planned_n"] for s, i in sets.items()} == {"medqa": 4, "pubmedqa": 3, "cmmlu": 5}
    planned = [i for s in ("medqa", "pubmedqa", "cmmlu") for i in sets[s]["question_ids"]]
    for v in ("base", "sft", "dpo", "simpo"):
        rows = [json.loads(x) for x in (evaluated / f"reports/eval/predictions/{v}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == planned
        assert all({"prompt_sha256", "raw", "extracted", "gold", "correct", "method"} <= set(r) for r in rows)
        assert all(r["correct"] == (r["extracted"] == r["gold"]) for r in rows)
        for s in sets:
            res = d["results"][v][s]
            assert res["question_ids"] == sets[s]["question_ids"] and res["n"] == sets[s]["planned_n"]
            assert res["ci_low"] <= res["accuracy"] <= res["ci_high"] and res["n_resamples"] == 200
            assert res["format_failures"] == sum(r["extracted"] is None for r in rows if r["set"] == s)


def test_both_protocols_score_every_variant_on_the_same_ids(evaluated):
    """loglik (lm-eval's log-likelihood multiple choice) beside generative_letter: every scored variant, the
    eval's own question ids in the same order, per-item records that lm-eval's scoring reproduces, figures the gate
    recomputes, both protocols in the report."""
    from pipeline import evalkit, loglik
    from pipeline.eval_audit import audit
    from pipeline.settings import load_config
    d = doc(evaluated)
    assert set(d["results_loglik"]) == set(d["results"]) == {"base", "sft", "dpo", "simpo"}
    assert d["protocols"] == {"results": "generative_letter", "results_loglik": "loglik"}
    sets = d["sets"]
    planned = [i for s in ("medqa", "pubmedqa", "cmmlu") for i in sets[s]["question_ids"]]
    firsts = []
    for v in ("base", "sft", "dpo", "simpo"):
        rel = f"reports/eval/predictions/loglik/{v}.jsonl"
        items = [json.loads(x) for x in (evaluated / rel).read_text().splitlines()]
        assert [r["id"] for r in items] == planned and d["outputs"][rel] == ev.sha256_file(evaluated / rel)
        for r in items:
            assert len(r["loglik"]) == len(r["choices"]) == len(r["continuations"]) and r["method"] == "loglik"
            assert r["extracted"] == r["choices"][max(range(len(r["loglik"])), key=r["loglik"].__getitem__)]
            assert r["correct"] == (r["extracted"] == r["gold"]) == (r["acc"] == 1.0)
            assert r["continuations"] == [" " + c for c in r["choices"]]     # lm-eval's target delimiter
        firsts.append(items[0]["loglik"])
        for s in sets:
            res, ps = d["results_loglik"][v][s], [r for r in items if r["set"] == s]
            assert res["question_ids"] == sets[s]["question_ids"] and res["n"] == sets[s]["planned_n"] == len(ps)
            assert res == {**res, **evalkit.accuracy_ci([r["correct"] for r in ps], seed=d["sets"][s]["seed"],
                                                        n_resamples=d["n_bootstrap"])}
            assert sum(t["n"] for t in res["harness"].values()) == len(ps) and res["format_failures"] == 0
            assert ("acc_norm" in res) == (s != "pubmedqa")       # lm-eval's pubmedqa reports acc only
    assert len({tuple(f) for f in firsts}) == 4       # each variant's own adapter, not the base four times
    assert {p["protocol"] for p in d["paired"]} == {"generative_letter", "loglik"}
    assert audit(load_config(overrides=ARGS), evaluated, d, REGISTRY.aligned) == []
    md = (evaluated / "reports/eval_default.md").read_text()
    assert "medqa, `generative_letter`" in md and "medqa, `loglik`" in md and "results_loglik.<variant>.<set>" in md
    assert f"lm_eval {d['loglik']['lm_eval']}" in md and d["loglik"]["num_fewshot"] == 0


def test_skipped_variant_is_listed_with_its_reason_and_never_scored(evaluated):
    d = doc(evaluated)
    assert d["variants"]["kto"]["status"] == "skipped" and KTO_SKIP in d["variants"]["kto"]["reason"]
    assert "kto" not in d["results"]
    assert not (evaluated / "reports/eval/predictions/kto.jsonl").exists()
    assert "kto" not in d["results_loglik"] and not (evaluated / "reports/eval/predictions/loglik/kto.jsonl").exists()
    assert all("kto" not in (p["a"], p["b"]) for p in d["paired"])
    assert {(p["a"], p["b"]) for p in d["paired"]} == {("sft", "base"), ("dpo", "sft"), ("dpo", "base"),
                                                       ("simpo", "sft"), ("simpo", "base")}
    md = (evaluated / "reports/eval_default.md").read_text()
    assert "kto" in md and KTO_SKIP in md and "reports/eval/eval_default.json" in md


def test_fallback_without_a_key_is_recorded_as_unavailable(evaluated):
    fb = doc(evaluated)["fallback"]
    assert fb["enabled"] is True and fb["available"] is False and "OPENAI_API_KEY" in fb["reason"]
    assert fb["n_sent"] == 0


def test_reports_stage_writes_every_file_and_says_what_was_skipped(evaluated):
    assert run_stage("judge") == "ok"      # both judges off: recorded as disabled
    assert run_stage("reports") == "ok"
    manifest = json.loads((evaluated / "reports/thesis_support/reports_manifest.json").read_text())
    assert ev.validate("reports", manifest) == []
    for rel in ("reports/sota_compare.md", "reports/error_analysis.md", "reports/thesis_support/thesis_draft_material.md",
                "reports/thesis_support/experiment_record.json", "reports/figures/eval_accuracy.png"):
        assert rel in manifest["outputs"] and (evaluated / rel).stat().st_size > 0
    sota = (evaluated / "reports/sota_compare.md").read_text()
    assert sota.index("This run") < sota.index("Published figures") and "arxiv.org/abs/2303.13375" in sota
    assert "### Protocol `free_answer_extraction`" in sota and "no published figure for tiny-qwen2" in sota
    assert KTO_SKIP in (evaluated / "reports/error_analysis.md").read_text()
    draft = (evaluated / "reports/thesis_support/thesis_draft_material.md").read_text()
    assert "data.length_bias" in draft and "smoke test" in draft
    record = json.loads((evaluated / "reports/thesis_support/experiment_record.json").read_text())
    assert record["stages"]["eval"]["status"] == "ok" and record["chat_template_sha256"]
    assert "OPENAI_API_KEY" not in record["env"]


def test_the_free_answer_protocol_scores_the_base_on_the_same_ids(evaluated):
    d = doc(evaluated)
    assert ev.validate("eval", d) == []
    assert list(d["results_free"]) == ["base"] and d["free_answer"]["sets"] == ["medqa", "pubmedqa"]
    assert d["free_answer"]["max_new_tokens"] == 12 and d["free_answer"]["protocol"] == "free_answer_extraction"
    rows = [json.loads(x) for x in (evaluated / "reports/eval/predictions/free/base.jsonl").read_text().splitlines()]
    for s in ("medqa", "pubmedqa"):
        res = d["results_free"]["base"][s]
        assert res["question_ids"] == d["results"]["base"][s]["question_ids"] == d["sets"][s]["question_ids"]
        assert res["n"] == len([r for r in rows if r["set"] == s]) and res["correct"] == sum(
            r["correct"] for r in rows if r["set"] == s)
    assert all(r["method"].startswith(("conclusion:", "whole:")) for r in rows)
    assert "protocol `free_answer_extraction`" in (evaluated / "reports/eval_default.md").read_text()


def test_the_gate_recomputes_the_free_answer_figures(evaluated):
    from pipeline.eval_free import audit
    from pipeline.settings import load_config
    cfg, d = load_config(overrides=ARGS), doc(evaluated)
    assert audit(cfg, evaluated, d) == []
    d["results_free"]["base"]["medqa"]["accuracy"] = 0.57        # raised to reach the published 57.0
    assert any(x.startswith("results_free.base.medqa.accuracy is 0.57") for x in audit(cfg, evaluated, d))


def test_a_published_number_without_its_protocol_is_rejected(tmp_path):
    from pipeline.anchors import ReferenceError, load_references
    assert all(r["protocol"] and r["source"]["url"] for r in load_references())   # the shipped file is complete
    bad = tmp_path / "references.yaml"
    bad.write_text("references:\n  - {model: X, set: medqa, split: test, n: 9, shots: 0, accuracy: 99.0, "
                   "confirmed: true, source: {kind: paper, title: p, table: t, url: 'https://x'}}\n")
    with pytest.raises(ReferenceError, match=r"references.yaml:2: references\[0\] \(X\) field 'protocol' is missing"):
        load_references(bad)


def test_eval_loads_the_base_once_and_records_memory_and_decoding(evaluated):
    d = doc(evaluated)
    assert len(BASE_LOADS) == 1, BASE_LOADS      # base, sft, dpo, simpo: one base, three adapters switched on it
    assert d["memory"] == {"max_live_models": 1, "base_loads": 1}
    dec = d["generation"]["decoding"]
    assert dec["do_sample"] is False and dec["num_beams"] == 1 and dec["repetition_penalty"] == 1.0
    assert dec["max_new_tokens"] == d["max_new_tokens"] and dec["temperature"] is None
    md = (evaluated / "reports/eval_default.md").read_text()
    assert "repetition_penalty 1.0" in md and "base loaded 1x, at most 1 alive" in md


def _ctx():
    from rich.console import Console
    from pipeline import engine
    from pipeline.settings import load_config
    return engine.make_ctx(REGISTRY["eval"], load_config(overrides=ARGS), Console(), REGISTRY)


def _logits(model, tok):
    import torch
    enc = tok(["<|im_start|>user\nWhat lowers a fever?<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_switched_adapters_give_what_a_fresh_load_gives(evaluated):
    """Each variant on the one shared base (adapters loaded, switched, deleted; base via disable_adapter)
    gives the logits of that variant loaded alone; going back to base or to an earlier adapter changes nothing."""
    import torch
    from pipeline import models
    from pipeline.variants import Variants, base_model_path, verified_adapter
    ctx = _ctx()
    fresh = {}
    for name in ("base", "sft", "dpo"):
        adapter = None if name == "base" else str(verified_adapter(ctx, name))
        model = models.load_model(base_model_path(ctx), ctx.plan, adapter=adapter)
        fresh[name] = _logits(model, models.load_tokenizer(base_model_path(ctx)))
        del model
        models.release()
    assert not torch.allclose(fresh["sft"], fresh["dpo"]) and not torch.allclose(fresh["base"], fresh["sft"])
    with Variants(ctx) as vs:
        for name in ("base", "sft", "dpo", "base", "sft", "sft", "dpo"):
            model, tok = vs.use(name)
            assert torch.allclose(_logits(model, tok), fresh[name], atol=1e-5), name
        assert vs.base_loads == 1 and models.live_models() == 1
        assert list(model.peft_config) == ["dpo"]          # earlier adapters were deleted after use
    del model
    models.release()
    assert models.live_models() == 0


def test_an_adapter_that_fails_to_load_leaves_no_half_loaded_model(evaluated, tmp_path):
    import shutil
    import torch
    from pipeline.variants import Variants, base_model_path, verified_adapter
    ctx = _ctx()
    bad = tmp_path / "bad"
    shutil.copytree(verified_adapter(ctx, "sft"), bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with Variants(ctx) as vs:
        want = _logits(*vs.use("dpo"))
        vs.use("sft")
        with pytest.raises(Exception):
            vs.load(base_model_path(ctx), bad, "bad")
        model, tok = vs.use("dpo")
        assert torch.allclose(_logits(model, tok), want, atol=1e-5) and list(model.peft_config) == ["dpo"]
        assert vs.memory() == {"max_live_models": 1, "base_loads": 2}   # the failed one was dropped, then reloaded


def _greedy_by_hand(model, tok, text: str, n: int) -> list[int]:
    """Argmax of the model's own logits, one token at a time, stopping at an end-of-turn token."""
    import torch
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    stop = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stop:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.fixture
def pushy_model(tmp_path_factory, tmp_path):
    """The tiny model with a generation_config.json that samples and penalizes repeats (as Qwen2.5's does)."""
    import shutil
    from pipeline import models
    src = models.build_tiny(tmp_path_factory.getbasetemp() / "medllm-cache" / "tiny-seed0")
    folder = tmp_path / "pushy"
    shutil.copytree(src, folder)
    tok = models.load_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 2.0,
         "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))
    return folder


def test_generation_is_greedy_whatever_the_models_generation_config_says(pushy_model):
    from pipeline import models
    from pipeline import training_checks as checker
    from pipeline.variants import Variants, generate
    plan = dict(checker.CPU_PLAN)
    model = models.load_model(pushy_model, plan)
    tok = models.load_tokenizer(pushy_model, padding_side="left")
    assert model.generation_config.repetition_penalty == 2.0 and model.generation_config.do_sample is True
    questions = ("头痛怎么办?", "What lowers a fever?", "Is aspirin safe?")
    prompts = [[{"role": "user", "content": q}] for q in questions]
    got = generate(model, tok, prompts, batch_size=1, max_new_tokens=16)
    for prompt, text in zip(prompts, got):
        chat = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert text == tok.decode(_greedy_by_hand(model, tok, chat, 16), skip_special_tokens=True).strip()
    # the gate's probe decodes the same way
    chat = tok.apply_chat_template([{"role": "user", "content": checker.PROBE_PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    want = tok.decode(_greedy_by_hand(model, tok, chat, checker.PROBE_TOKENS))
    del model
    with Variants(None, plan) as vs:
        assert checker.probe_checkpoint(vs, str(pushy_model), pushy_model) == (True, want)


def _holm_by_hand(ps: list[float]) -> list[float]:
    """Holm step-down: the i-th smallest of m p-values times (m - i), running maximum, capped at 1."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def test_the_day1_eval_reports_corrected_tests_power_and_answer_distributions(day1_env):
    """On the shared finished tiny Day-1: every paired test has p_holm (its protocol's family, checked by hand) and
    a paired CI of its difference; every variant and set has its answers against the gold; the reports say so."""
    root = day1_env
    d = doc(root)
    assert ev.validate("eval", d) == []
    paired = d["paired"]
    assert {p["protocol"] for p in paired} == {"generative_letter", "loglik"}
    for protocol in ("generative_letter", "loglik"):   # one Holm family per protocol
        family = [p for p in paired if p["protocol"] == protocol]
        assert [p["p_holm"] for p in family] == pytest.approx(_holm_by_hand([p["p_value"] for p in family]))
    for p in paired:
        ci = p["diff_ci"]
        assert p["survives_holm"] == (p["p_holm"] <= 0.05)
        assert ci["difference"] == pytest.approx(p["difference"]) and ci["n_resamples"] == d["n_bootstrap"]
        assert ci["ci_low"] <= p["difference"] <= ci["ci_high"]
    for s, info in d["sets"].items():
        assert d["min_detectable_difference"]["sets"][s]["n"] == info["planned_n"]
    for v in (v for v, e in d["variants"].items() if e["status"] == "scored"):
        rows = [json.loads(x) for x in (root / f"reports/eval/predictions/{v}.jsonl").read_text().splitlines()]
        for s, res in d["results"][v].items():
            a, ps = res["answers"], [r for r in rows if r["set"] == s]
            assert sum(a["predicted"].values()) + a["unanswered"] == res["n"] == len(ps)
            assert a["gold"] == {g: sum(r["gold"] == g for r in ps) for g in sorted({r["gold"] for r in ps})}
            assert a["unanswered"] == res["format_failures"]
    md = (root / "reports/eval_default.md").read_text()
    assert "Holm p" in md and "Holm-Bonferroni family" in md and "Minimum detectable difference" in md
    assert "no evidence of a difference larger than" in md or "survives Holm" in md
    assert "Answers against the gold" in md
    assert "Answers against the gold" in (root / "reports/error_analysis.md").read_text()
    assert "not corrected" not in (root / "reports/thesis_support/thesis_draft_material.md").read_text()


@pytest.mark.parametrize("missing", ["statsmodels", "lm_eval"])
def test_eval_without_statsmodels_fails_before_generating(day1_env, monkeypatch, missing):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find(name, *a))
    from pipeline.stages import eval as eval_stage
    monkeypatch.setattr(eval_stage, "generate", lambda *a, **k: pytest.fail(f"generated before checking {missing}"))
    assert main(["run", "eval", "--force", "--no-deps"]) != 0
    d = doc(day1_env)
    assert d["status"] == "failed" and f"{missing} is not installed" in d["reason"]
    assert "requirements.txt" in d["reason"]

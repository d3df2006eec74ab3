"""The whole Day-1 on the tiny tier in a temp PIPELINE_ROOT passes the gate; then each tamper makes the gate
fail with the right check id, and restoring the files makes it pass again."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import gate as G
from pipeline.__main__ import main
from pipeline.settings import load_config
from pipeline.stages import REGISTRY

REPO = Path(__file__).resolve().parents[2]
SFT = "reports/training/layer_b_tiny_sft_metrics.json"
SFT_FINAL = "checkpoints/layer_b/tiny_sft/final"


def gate(root: Path) -> dict:
    return G.evaluate(load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)}))


@pytest.fixture
def day1(tiny_day1, day1_env):
    """The session's real tiny Day-1 (training, eval, judges off, reports, dry run): tests/conftest.py."""
    return day1_env, tiny_day1[1]


@pytest.fixture
def fresh(day1):
    root, _ = day1
    assert gate(root)["strict_pass"], "the honest Day-1 must pass before it is tampered with"
    return root


def test_honest_day1_passes_the_gate_and_is_not_ready_for_writing(day1):
    root, _ = day1
    assert main(["check"]) == 0
    verdict = json.loads((root / "reports/migration/gpu_completion_check.json").read_text())
    assert verdict["strict_pass"] is True and verdict["failed"] == []
    ids = {c["id"] for c in verdict["checks"]}
    assert {"sft.checkpoint", "sft.curve", "dpo.from_sft", "eval.coverage", "judge.risk"} <= ids
    ready = json.loads((root / "reports/thesis_support/thesis_readiness.json").read_text())
    assert ready["ready_for_writing"] is False and any("tiny" in b for b in ready["blockers"])
    for rel in ("reports/eval_default.md", "reports/sota_compare.md", "reports/error_analysis.md",
                "reports/thesis_support/thesis_draft_material.md", "reports/thesis_support/experiment_record.json"):
        assert (root / rel).is_file(), rel


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _replace_sft_after_dpo(root: Path) -> None:
    """A different SFT final on disk, with metrics that describe it consistently: DPO trained on the old one."""
    _flip_byte(root / SFT_FINAL / "adapter_model.safetensors")
    from pipeline.evidence import sha256_json, sha256_tree
    files = sha256_tree(root / SFT_FINAL)
    _edit_json(root / SFT, lambda d: d.update(checkpoint_files=files, checkpoint_sha256=sha256_json(files)))


EVAL = "reports/eval/eval_default.json"


def _all_accuracies(value: float):
    def edit(doc):
        for sets in doc["results"].values():
            for res in sets.values():
                res["accuracy"] = value
    return edit


def _mark_correct_and_rehash(root: Path) -> None:
    """A wrong answer turned right in the predictions, the accuracy and the recorded hash made consistent."""
    from pipeline.evidence import sha256_file
    rel = "reports/eval/predictions/sft.jsonl"
    rows = [json.loads(line) for line in (root / rel).read_text().splitlines()]
    wrong = next(r for r in rows if not r["correct"])
    wrong["correct"] = True
    (root / rel).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def edit(doc):
        res = doc["results"]["sft"][wrong["set"]]
        res["correct"] += 1
        res["accuracy"] = res["correct"] / res["n"]
        doc["outputs"][rel] = sha256_file(root / rel)
    _edit_json(root / EVAL, edit)


def _loglik_marked_correct_and_rehashed(root: Path) -> None:
    """A wrong loglik item (lm-eval's per-item log sample) made right, the figure and the recorded hash consistent."""
    from pipeline.evidence import sha256_file
    rel = "reports/eval/predictions/loglik/sft.jsonl"
    items = [json.loads(line) for line in (root / rel).read_text().splitlines()]
    wrong = next(p for p in items if not p["correct"])
    wrong.update(acc=1.0, correct=True, extracted=wrong["gold"], raw=wrong["gold"])
    (root / rel).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in items))

    def edit(doc):
        res = doc["results_loglik"]["sft"][wrong["set"]]
        res["correct"] += 1
        res["accuracy"] = res["correct"] / res["n"]
        doc["outputs"][rel] = sha256_file(root / rel)
    _edit_json(root / EVAL, edit)


TAMPERS = {
    "one byte changed in a final adapter": (lambda r: _flip_byte(r / "checkpoints/kto-real-baseline/final/adapter_model.safetensors"), "kto.checkpoint"),
    "a final checkpoint deleted": (lambda r: shutil.rmtree(r / "checkpoints/simpo-real-baseline/final"), "simpo.checkpoint"),
    "SFT final replaced after DPO trained on the old one": (_replace_sft_after_dpo, "dpo.from_sft"),
    "dry-run evidence copied over a real one": (lambda r: shutil.copy(r / "reports/migration/dry_run.json", r / "reports/training/dpo_metrics.json"), "dpo.metrics"),
    "loss curve edited away from the trainer's log": (lambda r: _edit_json(r / SFT, lambda d: d["loss_curve"][-1].__setitem__(1, 0.001)), "sft.curve"),
    "global_step edited to the plan of a longer run": (lambda r: _edit_json(r / "reports/training/simpo_metrics.json", lambda d: d.update(planned_max_steps=d["planned_max_steps"] + 5)), "simpo.steps"),
    "every accuracy of the eval set to 0.93": (lambda r: _edit_json(r / EVAL, _all_accuracies(0.93)), "eval.numbers"),
    "a paired test's p-value edited": (lambda r: _edit_json(r / EVAL, lambda d: d["paired"][0].update(p_value=0.001)), "eval.numbers"),
    "a prediction marked correct, its file re-hashed": (_mark_correct_and_rehash, "eval.numbers"),
    "a loglik accuracy edited": (lambda r: _edit_json(r / EVAL, lambda d: d["results_loglik"]["base"]["medqa"].update(accuracy=0.93)), "eval.numbers"),
    "a loglik item marked correct, its file re-hashed": (_loglik_marked_correct_and_rehashed, "eval.numbers"),
    "a stage marked incomplete (killed)": (lambda r: (r / "reports/.incomplete").mkdir(exist_ok=True) or (r / "reports/.incomplete/kto.marker").write_text("{}"), "chain.no_incomplete"),
}


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tamper_is_caught_with_the_right_check(fresh, name):
    tamper, check_id = TAMPERS[name]
    tamper(fresh)
    verdict = gate(fresh)
    assert verdict["strict_pass"] is False
    assert check_id in verdict["failed"], (name, verdict["failed"])


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
def test_skipped_stage_edited_to_look_trained_is_caught(tmp_path, monkeypatch):
    for k, v in {"PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1",
                 "FORCE_SKIP_TRAINING": "true"}.items():
        monkeypatch.setenv(k, v)
    assert main(["run", "all"]) == 0            # skips are allowed, and recorded as skips
    verdict = gate(tmp_path)
    assert verdict["strict_pass"] is False and "sft.metrics" in verdict["failed"]
    detail = next(c["detail"] for c in verdict["checks"] if c["id"] == "sft.metrics")
    assert "FORCE_SKIP_TRAINING" in detail
    _edit_json(tmp_path / SFT, lambda d: d.update(status="ok", skipped=False, reason=None))
    verdict = gate(tmp_path)
    assert verdict["strict_pass"] is False and "sft.metrics" in verdict["failed"]
    assert main(["check"]) == 1


def _day1(env_extra: dict, root: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "MEDLLM_INJECT_OOM_AT_STEP")}
    env.update({"PIPELINE_ROOT": str(root), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), **env_extra})
    return subprocess.run(["bash", "day1_run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_day1_dry_run_trains_nothing(tmp_path):
    proc = _day1({"DAY1_DRY_RUN": "true", "MODEL_TIER": "tiny"}, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not (tmp_path / "checkpoints").exists()
    summary = (tmp_path / "reports/migration/day1_run_summary.md").read_text()
    assert "nothing was trained" in summary.lower()


@pytest.mark.slow   # make test keeps under 10 minutes; make test-slow (CI) runs it
def test_day1_7b_on_cpu_skips_honestly_and_exits_nonzero(tmp_path):
    proc = _day1({"MODEL_TIER": "7b"}, tmp_path)
    assert proc.returncode != 0
    summary = json.loads((tmp_path / "reports/migration/day1_run_summary.json").read_text())
    text = json.dumps(summary)
    assert "CUDA" in text
    sft = json.loads((tmp_path / "reports/training/layer_b_qwen25_7b_sft_metrics.json").read_text())
    assert sft["status"] == "skipped" and "CUDA" in sft["reason"]
    assert not any((tmp_path / "hf").rglob("*.safetensors")), "nothing may be downloaded for a tier that is not trained"


def test_eval_and_the_gate_probe_every_variant_on_one_base_load(day1, monkeypatch):
    """`run all` in one process: eval held one model (no training stage left one alive) and loaded the base once;
    the gate's probes (one per method) share one base load too."""
    root, _ = day1
    from pipeline import models
    memory = json.loads((root / "reports/eval/eval_default.json").read_text())["memory"]
    assert memory == {"max_live_models": 1, "base_loads": 1}
    loads, load = [], models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, *a, **k: loads.append(str(path)) or load(path, *a, **k))
    verdict = gate(root)
    probes = [c for c in verdict["checks"] if c["id"].endswith(".loads")]
    assert len(probes) == len(REGISTRY.methods) and all(c["passed"] for c in probes), probes
    assert len(loads) == 1 and verdict["max_live_models"] == 1 and verdict["base_loads"] == 1


# Keys a stage declares but reads only on some paths, which the tiny Day-1 (CPU, judges off, no OOM) does not take.
READ_ON_OTHER_PATHS = {
    "eval": {"judge.base_url", "judge.concurrency", "judge.max_reasks", "judge.max_retries", "judge.timeout_s"},
    "judge": {"eval.batch_size", "model.name", "model.tiny_seed", "runtime.force_skip_training",
              "runtime.rehearsal_fraction"},
    "dry_run": {"sft.max_length", "runtime.rehearsal_fraction"},   # a curriculum has its own lengths; rehearsal
    "gpu_check": {"model.tiny_seed", "runtime.rehearsal_changes"},   # in a rehearsal
    "sft": {"sft.max_length"},
}
TRAINING_OTHER_PATHS = {"{m}.max_oom_retries", "runtime.inject_oom_rank", "runtime.rehearsal_fraction"}


def test_every_stage_read_what_it_declared_and_declared_what_it_read(day1):
    """The engine records each stage's reads (`config_read`); a read outside the declaration fails the stage, so
    here we check the other way: nothing declared is unread except on the paths listed above."""
    root, _ = day1
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)})
    seen = 0
    for stage in REGISTRY.stages:
        doc = json.loads((root / stage.evidence(cfg)).read_text()) if (root / stage.evidence(cfg)).is_file() else None
        if doc is None:
            continue   # gpu_selftest: not part of the Day-1
        seen += 1
        if doc.get("reason_code") == "not_requested":   # skipped by the engine (Stage.requested): nothing ran
            assert doc["status"] == "skipped" and doc["config_read"] == [], stage.name
            continue
        read, declared = set(doc["config_read"]), set(stage.reads + stage.untracked)
        assert all(k in declared or k.partition(".")[0] in declared or "*" in declared for k in read), stage.name
        other = READ_ON_OTHER_PATHS.get(stage.name, set())
        if stage.method:
            other |= {k.format(m=stage.name) for k in TRAINING_OTHER_PATHS}
        unread = sorted(k for k in declared - other - {"*"} if k not in read and not any(r.startswith(k + ".") for r in read))
        assert unread == [], f"{stage.name} declares keys it never read: {unread}"
    assert seen >= 9


def test_the_up_to_date_path_imports_no_torch_transformers_or_trl(day1):
    """`make gpu-run` on a finished root: every stage up to date (gpu_check too, same machine), and the process
    never imports the heavy libraries (~6 s of imports per process otherwise)."""
    code = ("import runpy, sys\nsys.argv = ['pipeline', 'run', 'all']\ntry:\n    runpy.run_module('pipeline', "
            "run_name='__main__')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('HEAVY', [m for m in ('torch', 'transformers', 'trl') if m in sys.modules])")
    done = subprocess.run([os.sys.executable, "-c", code], cwd=REPO, env={**os.environ, "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "HEAVY []" in done.stdout
    assert done.stdout.count("up to date") >= 9, done.stdout[-2000:]


@pytest.mark.slow   # make test stays under 10 minutes on 2 cores; CI runs it in make test-slow
@pytest.mark.parametrize("override", ["eval.sets=[]", "eval.sets=[medqa]"])
def test_an_eval_configured_away_does_not_pass_the_gate(day1, override):
    """Issue 14 §2: with eval.sets=[] the eval was ok with no sets and strict_pass stayed true. The gate requires
    every bundled benchmark (pipeline/evalsets NAMES), whatever the config asks for."""
    root, _ = day1
    assert main(["run", "eval", override, "--no-deps"]) == 0
    assert main(["check", override]) == 1
    verdict = json.loads((root / "reports/migration/gpu_completion_check.json").read_text())
    assert "eval.coverage" in verdict["failed"]
    detail = next(c["detail"] for c in verdict["checks"] if c["id"] == "eval.coverage")
    assert "pubmedqa" in detail and "eval.sets" in detail


def test_eval_sample_sizes_below_the_tiers_are_refused_by_the_gate_and_readiness(day1):
    """The tiny tier's shipped sizes are the floor the gate accepts; a GPU tier's is the full set, for readiness
    even when eval.sets leaves sets out."""
    root, _ = day1
    cfg = load_config(tier="tiny", env={"PIPELINE_ROOT": str(root)}, overrides=["eval.sample_sizes={medqa: 2}"])
    doc = json.loads((root / "reports/eval/eval_default.json").read_text())
    info = doc["sets"]["medqa"]
    info.update(planned_n=2, question_ids=info["question_ids"][:2])
    for res in doc["results"].values():
        res["medqa"].update(n=2, question_ids=res["medqa"].get("question_ids", [])[:2])
    (root / "reports/eval/eval_default.json").write_text(json.dumps(doc))
    verdict = G.evaluate(cfg)
    assert "eval.coverage" in verdict["failed"]
    detail = next(c["detail"] for c in verdict["checks"] if c["id"] == "eval.coverage")
    assert "medqa" in detail and "at least 8" in detail
    from pipeline.readiness import thesis_readiness
    cfg7 = load_config(tier="7b", env={"PIPELINE_ROOT": str(root)}, overrides=["eval.sets=[medqa]"])
    blockers = " ".join(thesis_readiness(cfg7, True)["blockers"])
    assert "pubmedqa" in blockers and "cmmlu" in blockers and "full sets" in blockers

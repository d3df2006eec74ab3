"""Soak tests: survival under faults, reported as counts (not timings). Must-be-zero counters are marked.

Run: make soak          (= python -m scripts.soak; under 15 minutes on 2 CPU cores with the defaults)
     SOAK_N=10 python -m scripts.soak      (kill -9 trials per training stage; default 3)
     python -m scripts.soak --quick --out /tmp/s   (smallest settings: the smoke test)
Writes reports/soak/soak.json and soak.md. Order: one full tiny Day-1 with a marked API key and judges on
(the fake OpenAI server) -> (6) secrets scan -> (7) the gate's tamper cases -> (8) the root copied, moved and
exported -> (3) two pipelines on one root -> (1) kill -9 inside DPO, SimPO, KTO, SFT -> (2) kill during evidence
writes -> (4) malformed inputs through the CLI -> (5) judge faults.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

from pipeline import evalsets
from scripts.bench import QUICK_OVERRIDES, REPO, child_env, fake_server, machine, print_table

sys.path.insert(0, str(REPO))   # tests.* (the fake server, the malformed-input tables, the tamper cases)
DONE = ("ok", "dry_run")
REAL_CONFIG_DIR = None   # set by the malformed-input worker


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def load_cfg(base: dict):
    """The config the base run resolved (its env and key=value overrides): the gate compares against its plan."""
    from pipeline.settings import load_config
    return load_config(env=base["env"], overrides=base["overrides"])


# --- the base run: a full tiny Day-1, judges on, with a marked key -------------------------------------
def base_run(work: Path, overrides: list[str]) -> dict:
    key = f"sk-soak-MARKED-{secrets.token_hex(12)}"
    server = fake_server(api_key=key)
    root = work / "day1"
    env = child_env(root, ENABLE_LLM_JUDGE="true", ENABLE_LLM_RISK_JUDGE="true", ENABLE_V2_LLM_FALLBACK="true",
                    OPENAI_API_KEY=key, OPENAI_BASE_URL=server.base_url)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(root / "soak_stdout.log", "wb") as log:   # inside the root, so the secrets scan reads it too
        rc = subprocess.run(pipeline_cmd("run", "all", *overrides), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return {"root": root, "env": env, "overrides": overrides, "key": key, "server": server, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}


def scan_secrets(base: dict) -> dict:
    needle, hits, n_files = base["key"].encode(), {}, 0
    for p in base["root"].rglob("*"):
        if p.is_file() and not p.is_symlink():
            n_files += 1
            if (count := p.read_bytes().count(needle)):
                hits[str(p.relative_to(base["root"]))] = count
    authorized = sum(r["authorized"] for r in base["server"].requests)
    return {"files_scanned": n_files, "occurrences": sum(hits.values()), "files_with_key": hits,
            "judge_requests_with_the_key": authorized,
            "note": "the scan means something only if the key was used: judge_requests_with_the_key > 0"}


# --- (7) the gate's tamper cases, on the real run ------------------------------------------------------
def tamper_cases() -> list[tuple[str, str, object, str]]:
    """(source, name, tamper(root, cfg), failing check id): tests/e2e/test_day1.py's TAMPERS (written for a real run)
    and the table of tests/unit/test_checker.py, read from its parametrize mark."""
    from tests.e2e import test_day1 as e2e
    from tests.unit import test_checker as tc
    mark = next(m for m in tc.test_each_tamper_fails_its_check_and_restoring_passes.pytestmark if m.name == "parametrize")
    return ([("e2e", name, (lambda fn: lambda root, cfg: fn(root))(fn), check) for name, (fn, check) in e2e.TAMPERS.items()]
            + [("unit", fn.__name__, fn, check) for fn, check in mark.args[1]])


def tamper(base: dict) -> dict:
    from pipeline import gate as G
    root, cfg = base["root"], load_cfg(base)
    subprocess.run(pipeline_cmd("run", "dry_run", *base["overrides"]), cwd=REPO, env=base["env"], capture_output=True)
    backup = base["root"].parent / "day1-backup"   # dry_run.json: one e2e case copies it over real metrics
    for part in ("reports", "checkpoints"):
        shutil.copytree(root / part, backup / part)
    baseline = G.evaluate(cfg)
    cases = []
    for source, name, fn, failing_id in tamper_cases():
        fn(root, cfg)
        gate = G.evaluate(cfg)
        cases.append({"source": source, "case": name, "expected_failing": failing_id, "strict_pass": gate["strict_pass"],
                      "detected": not gate["strict_pass"] and failing_id in gate["failed"], "failed": gate["failed"]})
        for part in ("reports", "checkpoints"):
            shutil.rmtree(root / part)
            shutil.copytree(backup / part, root / part)
    return {"baseline_strict_pass": baseline["strict_pass"], "baseline_failed": baseline["failed"],
            "detected": sum(c["detected"] for c in cases), "total": len(cases),
            "by_source": {s: f"{sum(c['detected'] for c in cases if c['source'] == s)}/{sum(c['source'] == s for c in cases)}"
                          for s in ("e2e", "unit")},
            "missed": [c for c in cases if not c["detected"]],
            "restored_strict_pass": G.evaluate(cfg)["strict_pass"]}


# --- (8) the finished root copied, moved and unpacked from `make export` ---------------------------------
def moved_root(base: dict, work: Path) -> dict:
    """Each place must get the original's verdict (strict_pass and the failing checks, whatever they are) and find
    every stage of `run all` up to date (nothing re-runs). The move takes the root away for the duration (nothing
    may still point into it) and puts it back."""
    import tarfile
    from scripts import export
    root, top = base["root"], work / "moved"
    top.mkdir()
    original = _check_and_rerun(base, root, "original")
    shutil.copytree(root, top / "copy", symlinks=True)
    with contextlib.redirect_stdout(io.StringIO()), tarfile.open(export.pack(root, top / "day1.tar.gz")) as tar:
        tar.extractall(top / "unpacked", filter="data")
    rows = []
    for how, where in (("copy", top / "copy"), ("move", top / "moved"), ("export", top / "unpacked" / "day1")):
        if how == "move":
            shutil.move(root, where)
        try:
            rows.append(_check_and_rerun(base, where, how))
        finally:
            if how == "move":
                shutil.move(where, root)
        rows[-1]["same_verdict"] = (rows[-1]["strict_pass"], rows[-1]["failed"]) == (original["strict_pass"],
                                                                                    original["failed"])
    return {"setup": "the finished root copied (shutil.copytree), moved away (shutil.move, then back) and packed "
                     "with `make export` then unpacked elsewhere; in each: `python -m pipeline check` (its verdict "
                     "must be the original's), then `run all` (nothing may re-run)",
            "original": original, "tried": len(rows), "same_verdict": sum(r["same_verdict"] for r in rows),
            "reran": sum(len(r["reran"]) for r in rows),
            "tracebacks": sum(r["tracebacks"] for r in [original, *rows]), "rows": rows}


def _check_and_rerun(base: dict, where: Path, how: str) -> dict:
    from pipeline.gate import GATE
    from pipeline.stages import REGISTRY
    env = {**base["env"], "PIPELINE_ROOT": str(where), "COLUMNS": "200"}
    check = subprocess.run(pipeline_cmd("check", *base["overrides"]), cwd=REPO, env=env, capture_output=True,
                           text=True)
    verdict = json.loads((where / GATE).read_text()) if (where / GATE).is_file() else {}
    again = subprocess.run(pipeline_cmd("run", "all", *base["overrides"]), cwd=REPO, env=env, capture_output=True,
                           text=True)
    said = check.stdout + check.stderr + again.stdout + again.stderr
    stages = [s.name for s in REGISTRY.stages if s.in_all and not s.always_run]
    return {"how": how, "strict_pass": verdict.get("strict_pass"), "failed": verdict.get("failed"),
            "check_rc": check.returncode, "run_all_rc": again.returncode,
            "reran": [n for n in stages if f"✓ {n}: up to date" not in again.stdout],
            "tracebacks": said.count("Traceback (most recent call last)")}


# --- (9) a failed attempt with other settings keeps the finished work ------------------------------------------
def failed_attempt(base: dict, stages: list[str]) -> dict:
    """Issue 14 §1: per stage, two attempts with a setting that changes its fingerprint and fails at once
    (`<stage>.trl={no_such_field: 1}`), then `run <stage>` with the original config. Lost: a final that is gone or
    changed, or a stage that trained again (its metrics' checkpoint files differ)."""
    from pipeline import evidence as ev
    from pipeline.stages import REGISTRY
    cfg, rows = load_cfg(base), []
    for name in stages:
        stage = REGISTRY[name]
        final = base["root"] / stage.checkpoint(cfg) / "final"
        before = ev.sha256_tree(final) if final.is_dir() else None
        runs = [subprocess.run(pipeline_cmd("run", name, *base["overrides"], *extra), cwd=REPO, env=base["env"],
                               capture_output=True, text=True)
                for extra in ([f"{name}.trl={{no_such_field: 1}}"],) * 2 + ([],)]
        said = "".join(r.stdout + r.stderr for r in runs)
        doc = ev.read_json(base["root"] / stage.evidence(cfg)) or {}
        kept = before is not None and final.is_dir() and ev.sha256_tree(final) == before \
            and doc.get("checkpoint_files") == before
        rows.append({"stage": name, "failed_rcs": [r.returncode for r in runs[:2]], "rerun_rc": runs[2].returncode,
                     "kept": kept, "restored": "restored" in runs[2].stdout,
                     "tracebacks": said.count("Traceback (most recent call last)")})
    return {"setup": "per stage: two failing attempts with another fingerprint (`<stage>.trl={no_such_field: 1}`), "
                     "then `run <stage>` with the original config; kept = the same final, not retrained",
            "tried": len(rows), "kept": sum(r["kept"] for r in rows),
            "lost": sum(not r["kept"] or r["rerun_rc"] != 0 or 0 in r["failed_rcs"] for r in rows),
            "tracebacks": sum(r["tracebacks"] for r in rows), "rows": rows}


# --- (3) two pipelines on one root ---------------------------------------------------------------------
def two_pipelines(base: dict, trials: int, overrides: list[str]) -> dict:
    env, lock = base["env"], base["root"] / ".pipeline.lock"
    rows = []
    for _ in range(trials):
        # A re-probes the hardware (torch import, a few seconds under the lock): a no-op `run all` is now done
        # in a fraction of a second, before B could even start
        a = subprocess.Popen(pipeline_cmd("run", "gpu_check", "--force", *overrides), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and a.poll() is None and lock.read_text().strip() != str(a.pid):
            time.sleep(0.01)
        held = a.poll() is None
        t0 = time.perf_counter()
        b = subprocess.run(pipeline_cmd("run", "all", *overrides), cwd=REPO, env=env, capture_output=True, text=True)
        b_wall = time.perf_counter() - t0
        a_alive = a.poll() is None   # A still held the lock when B was done: they overlapped
        a_rc = a.wait()
        said = "another pipeline" in (b.stdout + b.stderr)
        rows.append({"a_held_the_lock_when_b_started": held, "b_refused": b.returncode != 0 and said, "b_rc": b.returncode,
                     "b_seconds_to_exit": round(b_wall, 2), "a_rc": a_rc,
                     "ran_concurrently": held and a_alive and b.returncode == 0 and not said})
    refused = [r["b_seconds_to_exit"] for r in rows if r["b_refused"]]
    return {"trials": trials, "refusals": len(refused), "a_still_finished_ok": sum(r["a_rc"] == 0 for r in rows),
            "ran_concurrently": sum(r["ran_concurrently"] for r in rows),
            "seconds_to_refuse_median": sorted(refused)[len(refused) // 2] if refused else None, "rows": rows,
            "setup": "A = `run gpu_check --force` (a hardware probe, holding the lock); B = `run all`, started once "
                     "A's PID is in .pipeline.lock; concurrent = B ran to the end while A was still running; B's wall "
                     "time includes Python start-up"}


# --- (1) kill -9 inside each training stage ------------------------------------------------------------
def kill_trials(base: dict, stages: list[str], n: int, rng: random.Random, overrides: list[str]) -> dict:
    from pipeline import engine, training
    from pipeline import gate as G
    from pipeline import evidence as ev
    root, env, cfg = base["root"], base["env"], load_cfg(base)
    from pipeline.stages import REGISTRY
    out = {}
    for stage in stages:
        st = REGISTRY[stage]
        evid, marker = root / st.evidence(cfg), engine.marker_path(st, cfg)
        expected = (ev.read_json(evid) or {}).get("duration_s") or 30.0
        folder = root / training.output_dir(cfg, stage)
        rows = []
        log_path = root / "reports" / "logs" / f"{stage}_full.log"
        for i in range(n):
            shutil.rmtree(folder, ignore_errors=True)            # each trial trains the stage from scratch
            for p in (evid, evid.with_suffix(".previous.json")):
                p.unlink(missing_ok=True)
            # even trials: at a random optimizer step (mid-training, around checkpoints); odd: at a random time
            # after the stage started (model load, tokenization, saving, evidence)
            at_step = rng.randint(1, getattr(cfg, stage).max_steps - 1) if i % 2 == 0 else None
            delay = rng.uniform(0.0, 0.3) if at_step else rng.uniform(0.02, 1.0) * expected
            offset = log_path.stat().st_size if log_path.is_file() else 0
            with open(root / "reports" / "logs" / f"soak_kill_{stage}.log", "ab") as log:
                proc = subprocess.Popen(pipeline_cmd("run", stage, "--no-deps", *overrides), cwd=REPO, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                deadline = time.time() + 300
                while time.time() < deadline and proc.poll() is None and not marker.exists():
                    time.sleep(0.01)
                while at_step and time.time() < deadline and proc.poll() is None and _steps_logged(log_path, offset) < at_step:
                    time.sleep(0.02)
                time.sleep(delay)
                ended_first = proc.poll() is not None
                with contextlib.suppress(ProcessLookupError):   # it may have finished (and been reaped) first
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            marker_after_kill, logged = marker.exists(), _steps_logged(log_path, offset)
            doc = ev.read_json(evid)
            ok_after = isinstance(doc, dict) and doc.get("status") == "ok"
            complete = ok_after and (root / doc["checkpoint_dir"]).is_dir() and \
                ev.sha256_tree(root / doc["checkpoint_dir"]) == doc["checkpoint_files"] and doc["global_step"] == doc["planned_max_steps"]
            ckpts = sorted(p.name for p in folder.glob("checkpoint-*")) if folder.is_dir() else []
            rerun = subprocess.run(pipeline_cmd("run", stage, "--no-deps", *overrides), cwd=REPO, env=env,
                                   capture_output=True, text=True)
            doc2 = ev.read_json(evid) or {}
            every = getattr(cfg, stage).logging_steps
            steps = [s for s, _ in doc2.get("loss_curve", [])]
            planned = doc2.get("planned_max_steps")
            gate = G.check_stage(cfg, stage)
            rows.append({"kill_at": f"step {at_step} + {delay:.2f} s" if at_step else f"{delay:.2f} s after the marker",
                         "steps_logged_at_kill": logged, "process_ended_before_kill": ended_first,
                         "ok_evidence_after_kill": ok_after, "ok_too_early": ok_after and not ended_first, "ok_evidence_complete": complete,
                         "marker_after_kill": marker_after_kill, "checkpoints_at_kill": ckpts,
                         "rerun_rc": rerun.returncode, "rerun_status": doc2.get("status"), "resumed_from": doc2.get("resumed_from"),
                         "reached_plan": doc2.get("global_step") == planned and planned is not None,
                         "continuous_curve": bool(steps) and steps == list(range(every, planned + 1, every)),
                         "gate_passed": all(c["passed"] for c in gate),
                         "gate_failed": [c["id"] for c in gate if not c["passed"]]})
        out[stage] = {"trials": n, "killed_inside": sum(not r["process_ended_before_kill"] for r in rows),
                      "resumed_from_checkpoint": sum(bool(r["resumed_from"]) for r in rows),
                      "reruns_ok": sum(r["rerun_status"] == "ok" and r["reached_plan"] and r["continuous_curve"] and r["gate_passed"]
                                       for r in rows),
                      "ok_evidence_after_kill": sum(r["ok_evidence_after_kill"] for r in rows),
                      "ok_evidence_too_early": sum(r["ok_too_early"] for r in rows), "rows": rows}
    return out


def _steps_logged(log: Path, offset: int) -> int:
    """Training log lines ({'loss': ...}, one per optimizer step) written to the stage's tee'd log since offset."""
    if not log.is_file():
        return 0
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().count(b"{'loss':")


# --- (2) kill during evidence writes -------------------------------------------------------------------
WRITER = r'''
import itertools, os, sys
from pipeline.evidence import atomic_write_json
folder, size, plain = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "plain"
for i in itertools.count():
    doc = {"i": i, "blob": "x" * (size + i % 997)}
    doc["n"] = len(doc["blob"])
    path = os.path.join(folder, f"evidence{i % 3}.json")
    if plain:   # the control: a plain overwrite, which a kill can cut
        with open(path, "w") as f:
            f.write(__import__("json").dumps(doc))
    else:
        atomic_write_json(path, doc)
'''


def evidence_write_kills(work: Path, kills: int, rng: random.Random, size: int = 2_000_000) -> dict:
    def run(mode: str, n: int) -> dict:
        folder = work / f"writes-{mode}"
        folder.mkdir()
        corrupt = checked = 0
        for _ in range(n):
            proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(size), mode], cwd=REPO)
            time.sleep(rng.uniform(0.15, 0.6))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for f in folder.glob("evidence*.json"):
                checked += 1
                try:
                    doc = json.loads(f.read_text())
                    corrupt += len(doc["blob"]) != doc["n"]
                except (ValueError, KeyError):
                    corrupt += 1
        return {"kills": n, "files_checked": checked, "corrupt_files": corrupt,
                "temp_files_left": len(list(folder.glob(".*.tmp")))}
    atomic = run("atomic", kills)
    control = run("plain", max(5, kills // 4))
    return {"setup": f"a process looping pipeline.evidence.atomic_write_json over 3 files with ~{size / 1e6:g} MB "
                     "payloads, SIGKILLed at random times; then every file parsed and its length checked. The control "
                     "writes the same way with a plain open().write: it shows the check can see a cut file",
            **atomic, "control_plain_write": control}


# --- (4) the malformed-input corpus through the CLI (a worker process; the engine tees fd 1/2) ----------
LOADER_OVERRIDES = {
    "sft": lambda d: [f"data.sft_path={d / 'sft.jsonl'}"], "pref": lambda d: [f"data.preference_path={d / 'prefs.json'}"],
    "kto": lambda d: [f"data.kto_path={d / 'kto.jsonl'}"], "medqa": lambda d: [f"data.medqa_path={d / 'medqa.jsonl'}"],
    "cmmlu": lambda d: [f"data.cmmlu_dir={d}"],
    "pubmedqa": lambda d: [f"data.pubmedqa_path={d / 'ori_pqal.json'}", f"data.pubmedqa_test_ids={d / 'test_ground_truth.json'}"],
}


def _cli(argv: list[str], env: dict) -> tuple[int, str]:
    from pipeline import settings
    from pipeline.__main__ import main
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                rc = main(argv)
            except SystemExit as exc:   # argparse / unknown stage / lock: a message and an exit code
                rc = exc.code if isinstance(exc.code, int) else 1
                print(exc.code)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        settings.CONFIG_DIR = REAL_CONFIG_DIR
    return rc, buf.getvalue()


def _done_evidence(root: Path) -> list[str]:
    found = []
    for p in (root / "reports").rglob("*.json") if (root / "reports").is_dir() else ():
        doc = json.loads(p.read_text()) if p.suffix == ".json" else None
        if isinstance(doc, dict) and doc.get("stage") not in (None, "gpu_check") and doc.get("status") in DONE:
            found.append(str(p.relative_to(root)))
    return found


def malformed_worker(work: Path, out_json: Path) -> None:
    from pipeline import settings
    from tests.unit import test_data as td
    from tests.unit import test_settings as ts
    global REAL_CONFIG_DIR
    REAL_CONFIG_DIR = settings.CONFIG_DIR
    base = child_env(None, MEDLLM_CACHE=work / "cache")
    rows = []
    for i, (case, (files, extra, args, needles)) in enumerate(ts.MALFORMED.items()):
        case_dir = work / f"config-{i}"
        (case_dir / "configs" / "tiers").mkdir(parents=True)
        for tier in settings.TIERS:   # a tier file must exist (an empty one sets nothing), as in the unit test
            (case_dir / "configs" / "tiers" / f"{tier}.yaml").write_text("")
        for rel, text in files.items():   # an empty configs/ with only the case's files, as the unit test does
            (case_dir / "configs" / rel).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        settings.CONFIG_DIR = case_dir / "configs"
        rc, text = _cli(["run", "gpu_check", *args], {**base, "PIPELINE_ROOT": str(case_dir / "out"), **extra})
        named = all(n in text for n in needles) or (args and all(repr(a) in text for a in args))   # argv: quoted back
        rows.append({"kind": "config", "case": case, "rc": rc, "clear": rc != 0 and bool(named),
                     "ok_evidence": _evidence_any(case_dir / "out"), "message": text.strip().splitlines()[-1][:300] if text.strip() else ""})
    from tests.unit import test_bad_values as tb   # the generated corpus: every bad number of every field and env var
    settings.CONFIG_DIR = REAL_CONFIG_DIR
    for kind, cases in (("generated argument", [([f"{k}={v}"], {}, f"argument {k}={v}") for k, v in tb.CORPUS]),
                        ("generated env var", [([], {var: v}, f"environment variable {var}") for var, v in tb.ENV_CASES])):
        for args, extra, needle in cases:
            out = work / "generated" / "out"
            rc, text = _cli(["run", "gpu_check", *args], {**base, "PIPELINE_ROOT": str(out), **extra})
            last = text.strip().splitlines()[-1] if text.strip() else ""
            rows.append({"kind": kind, "case": needle, "rc": rc, "clear": rc != 0 and needle in last
                         and "Traceback" not in text, "ok_evidence": _evidence_any(out), "message": last[:300]})
    for case, loader, files, where, field in td.BAD:
        case_dir = work / f"data-{case}"
        case_dir.mkdir(parents=True)
        for name, content in files.items():
            (case_dir / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        root = case_dir / "out"
        rc, _ = _cli(["run", "dry_run", *LOADER_OVERRIDES[loader](case_dir)], {**base, "PIPELINE_ROOT": str(root)})
        doc = json.loads((root / "reports/migration/dry_run.json").read_text()) if (root / "reports/migration/dry_run.json").is_file() else {}
        reason = doc.get("reason") or ""
        rows.append({"kind": "data", "case": case, "rc": rc, "clear": rc != 0 and f"{where}: field '{field}':" in reason,
                     "ok_evidence": _done_evidence(root), "message": reason[:300]})
    out_json.write_text(json.dumps(rows, indent=2))


def _evidence_any(root: Path) -> list[str]:
    """A config error must stop before any stage: every evidence file with a done status counts (gpu_check too)."""
    found = []
    for p in (root / "reports").rglob("*.json") if (root / "reports").is_dir() else ():
        doc = json.loads(p.read_text())
        if isinstance(doc, dict) and doc.get("status") in DONE:
            found.append(str(p.relative_to(root)))
    return found



def malformed(work: Path) -> dict:
    out_json = work / "malformed.json"
    with open(work / "malformed.log", "wb") as log:
        subprocess.run([sys.executable, "-m", "scripts.soak", "--malformed-worker", str(work / "malformed"), str(out_json)],
                       cwd=REPO, env=child_env(None), stdout=log, stderr=subprocess.STDOUT)
    rows = json.loads(out_json.read_text()) if out_json.is_file() else []
    return {"setup": "tests/unit/test_settings.py MALFORMED through `python -m pipeline run gpu_check` (configs/ replaced "
                     "by the case's files), tests/unit/test_bad_values.py CORPUS/ENV_CASES (every bad number of every "
                     "field and env var) the same way, and tests/unit/test_data.py BAD through `python -m pipeline run dry_run` "
                     "(the case's file as the data path); clear = non-zero exit and the message names the place "
                     "(the unit test's substrings / file:line and field)",
            "total": len(rows), "clear_errors": sum(r["clear"] for r in rows),
            "ok_evidence_written": sum(len(r["ok_evidence"]) for r in rows),
            "unclear": [r for r in rows if not r["clear"]],
            "by_kind": {k: sum(r["kind"] == k for r in rows) for k in dict.fromkeys(r["kind"] for r in rows)}}


# --- (5) judge faults ------------------------------------------------------------------------------------
def judge_faults(work: Path, n: int, seed: int) -> dict:
    from pipeline import judgekit
    from tests.fakes.openai_server import fake_reply
    rates = {"429": 0.1, "500": 0.1, "hang": 0.05, "malformed": 0.05, "unparsable": 0.1}
    server = fake_server(api_key="sk-soak-judge", fault_rates=rates, seed=seed, hang_s=3.0)
    items = {"pairwise": [{"question_id": f"q{i}", "variant": "dpo", "question": f"Question {i}?", "order": "ab",
                           "answer_a": "A fuller answer. " * (i % 3), "answer_b": "Short. " * (i % 2 + 1)} for i in range(n)],
             "risk": [{"question_id": f"q{i}", "variant": "sft", "question": f"Question {i}?", "answer": f"Answer {i}."}
                      for i in range(n)]}
    try:
        totals = {"items": 0, "completed": 0, "unjudged": 0, "fabricated": 0, "completed_after_clean_rerun": 0}
        for kind, its in items.items():
            cache = judgekit.JudgeCache(work / f"judge-faults-{kind}.jsonl")
            kw = dict(kind=kind, base_url=server.base_url, api_key=server.api_key, model="fake-judge", cache=cache,
                      concurrency=8, timeout_s=1.0, max_retries=2, max_reasks=1)
            out = asyncio.run(judgekit.judge_all(its, **kw))
            for it, r in zip(its, out["results"]):
                if r["status"] == "judged":
                    truth = judgekit.PARSERS[kind](fake_reply(judgekit.build_messages(kind, it)))
                    key = "winner" if kind == "pairwise" else "level"
                    totals["fabricated"] += r["verdict"][key] != truth[key]
                elif r.get("verdict") is not None:
                    totals["fabricated"] += 1   # an unjudged record must carry no verdict
            totals["items"] += len(its)
            totals["completed"] += out["n_judged"]
            totals["unjudged"] += out["n_unjudged"]
            server.fault_rates = {}          # the endpoint recovers: a re-run asks only what is missing
            again = asyncio.run(judgekit.judge_all(its, **kw))
            totals["completed_after_clean_rerun"] += again["n_judged"]
            server.fault_rates = dict(rates)
        retried = sum(r["retry_count"] not in (None, "0") for r in server.requests)
    finally:
        server.stop()
    faults = {}
    for r in server.requests:
        faults[r["fault"]] = faults.get(r["fault"], 0) + 1
    return {"setup": f"{n} pairwise + {n} risk items, fake server with fault rates {rates} (hang = 3 s against a 1 s "
                     "client timeout), client max_retries 2, 1 re-ask; fabricated = a judged verdict that differs from "
                     "the server's deterministic verdict, or a verdict on an unjudged record",
            **totals, "requests": len(server.requests), "retried_requests": retried, "faults_served": faults}


# --- report ------------------------------------------------------------------------------------------------
def summary_rows(res: dict) -> list[tuple[str, str, str]]:
    rows = []
    if k := res.get("kill9"):
        for stage, v in k.items():
            rows.append(("kill -9", f"{stage}: reruns at plan, continuous, gate ok / trials (killed inside)",
                         f"{v['reruns_ok']}/{v['trials']} ({v['killed_inside']}, resumed {v['resumed_from_checkpoint']})"))
        rows.append(("kill -9", "ok evidence after a kill inside the stage (must be 0)",
                     str(sum(v["ok_evidence_too_early"] for v in k.values()))))
    if e := res.get("evidence_writes"):
        rows.append(("evidence writes", "corrupt or partial JSON / kills (must be 0)", f"{e['corrupt_files']} / {e['kills']}"))
        rows.append(("evidence writes", "control (plain write): corrupt / kills", f"{e['control_plain_write']['corrupt_files']} / "
                     f"{e['control_plain_write']['kills']}"))
    if t := res.get("two_pipelines"):
        rows.append(("two pipelines", "refusals / trials, median s to refuse", f"{t['refusals']}/{t['trials']}, {t['seconds_to_refuse_median']}"))
        rows.append(("two pipelines", "ran concurrently (must be 0)", str(t["ran_concurrently"])))
    if m := res.get("malformed"):
        rows.append(("malformed input", "clear errors / total", f"{m['clear_errors']}/{m['total']}"))
        rows.append(("malformed input", "ok evidence written (must be 0)", str(m["ok_evidence_written"])))
    if j := res.get("judge_faults"):
        rows.append(("judge faults", "completed / unjudged / items, retried requests",
                     f"{j['completed']} / {j['unjudged']} / {j['items']}, {j['retried_requests']}"))
        rows.append(("judge faults", "completed after a clean re-run", f"{j['completed_after_clean_rerun']}/{j['items']}"))
        rows.append(("judge faults", "fabricated (must be 0)", str(j["fabricated"])))
    if s := res.get("secrets"):
        rows.append(("secrets", f"key occurrences in {s['files_scanned']} files (must be 0)", str(s["occurrences"])))
        rows.append(("secrets", "judge requests that used the key", str(s["judge_requests_with_the_key"])))
    if mv := res.get("moved_root"):
        rows.append(("moved root", "the original's verdict / tried (copy, move, unpacked export; original "
                     "strict_pass)", f"{mv['same_verdict']}/{mv['tried']} ({mv['original']['strict_pass']})"))
        rows.append(("moved root", "stages re-run, tracebacks (must be 0)", f"{mv['reran']}, {mv['tracebacks']}"))
    if fa := res.get("failed_attempt"):
        rows.append(("failed attempt", "finished work kept / tried, lost, tracebacks (must be 0)",
                     f"{fa['kept']}/{fa['tried']}, {fa['lost']}, {fa['tracebacks']}"))
    if t := res.get("tamper"):
        rows.append(("tamper", "detected / total (e2e, unit tables; baseline strict_pass)",
                     f"{t['detected']}/{t['total']} ({t['by_source']['e2e']}, {t['by_source']['unit']}; {t['baseline_strict_pass']})"))
    return rows


def must_be_zero(res: dict) -> dict:
    k, mv = res.get("kill9", {}), res.get("moved_root", {})
    return {"kill9.ok_evidence_too_early": sum(v["ok_evidence_too_early"] for v in k.values()),
            "evidence_writes.corrupt_files": res.get("evidence_writes", {}).get("corrupt_files", 0),
            "malformed.ok_evidence_written": res.get("malformed", {}).get("ok_evidence_written", 0),
            "judge_faults.fabricated": res.get("judge_faults", {}).get("fabricated", 0),
            "secrets.occurrences": res.get("secrets", {}).get("occurrences", 0),
            "two_pipelines.ran_concurrently": res.get("two_pipelines", {}).get("ran_concurrently", 0),
            "moved_root.verdict_differs": mv.get("tried", 0) - mv.get("same_verdict", 0),
            "moved_root.reran": mv.get("reran", 0), "moved_root.tracebacks": mv.get("tracebacks", 0),
            "failed_attempt.lost": res.get("failed_attempt", {}).get("lost", 0),
            "failed_attempt.tracebacks": res.get("failed_attempt", {}).get("tracebacks", 0)}


def write_reports(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    m = res["machine"]
    lines = ["# Soak tests", "", f"Measured {res['finished_at']} on {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gb']} GB RAM, "
             f"GPU: {m['gpu'] or 'none'}; total {res['total_s']:.0f} s; kill trials per stage: {res['n']}; seed {res['seed']}.",
             f"Must-be-zero counters: {'all zero' if not any(res['must_be_zero'].values()) else res['must_be_zero']}.", "",
             "| area | count | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(res)]
    for key in ("moved_root", "failed_attempt", "evidence_writes", "two_pipelines", "malformed", "judge_faults"):
        if key in res:
            lines += ["", f"**{key}**: {res[key]['setup']}"]
    if res.get("malformed", {}).get("unclear"):
        lines += ["", "Malformed inputs without a clear error:"] + [f"- {r['kind']} `{r['case']}` (exit {r['rc']}): {r['message']}"
                                                                   for r in res["malformed"]["unclear"]]
    if res.get("tamper", {}).get("missed"):
        lines += ["", "Tamper cases the gate missed:"] + [f"- `{c['case']}` (expected {c['expected_failing']}, failed: {c['failed']})"
                                                         for c in res["tamper"]["missed"]]
    (out / "soak.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest settings (tests): few steps, one KTO kill trial")
    ap.add_argument("--out", default=str(REPO / "reports" / "soak"))
    ap.add_argument("--malformed-worker", nargs=2, metavar=("WORKDIR", "OUT_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.malformed_worker:
        malformed_worker(Path(args.malformed_worker[0]), Path(args.malformed_worker[1]))
        return 0
    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers' deprecations, once per probe
    n = 1 if args.quick else int(os.environ.get("SOAK_N") or 3)
    seed = int(os.environ.get("SOAK_SEED") or 0)
    rng = random.Random(seed)
    # the gate requires the tier's shipped eval sizes (configs/tiers/tiny.yaml: 8 per set), so the soak's base run
    # keeps them: a baseline that fails the gate would make every tamper look "detected"
    overrides = [*QUICK_OVERRIDES, "eval.sample_sizes={%s}" % ", ".join(f"{n}: 8" for n in evalsets.names())] \
        if args.quick else []
    from pipeline.stages import REGISTRY
    stages = ["kto"] if args.quick else [*REGISTRY.aligned, "sft"]   # sft last: retraining it would re-chain the others
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "n": n, "seed": seed, "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="medllm-soak-") as tmp:
        work = Path(tmp)
        print("[soak] base run: a full tiny Day-1 with a marked key ...", flush=True)
        base = base_run(work, overrides)
        try:
            res["base_run"] = {"rc": base["rc"], "wall_s": base["wall_s"]}
            steps = [("secrets", lambda: scan_secrets(base)), ("tamper", lambda: tamper(base)),
                     ("moved_root", lambda: moved_root(base, work)),
                     ("failed_attempt", lambda: failed_attempt(base, ["sft"] if args.quick else ["sft", *REGISTRY.aligned])),
                     ("two_pipelines", lambda: two_pipelines(base, 1 if args.quick else 3, overrides)),
                     ("kill9", lambda: kill_trials(base, stages, n, rng, overrides)),
                     ("evidence_writes", lambda: evidence_write_kills(work, 8 if args.quick else 40, rng)),
                     ("malformed", lambda: malformed(work)),
                     ("judge_faults", lambda: judge_faults(work, 12 if args.quick else 40, seed))]
            for name, fn in steps:
                t = time.perf_counter()
                print(f"[soak] {name} ...", flush=True)
                res[name] = fn()
                print(f"[soak] {name} done in {time.perf_counter() - t:.1f} s", flush=True)
                res.setdefault("wall_s", {})[name] = round(time.perf_counter() - t, 1)
        finally:
            base["server"].stop()
    res["total_s"] = round(time.perf_counter() - t0, 1)
    res["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    res["must_be_zero"] = must_be_zero(res)
    out = Path(args.out)
    write_reports(out, res)

    print_table(f"make soak ({res['total_s']:.0f} s, {res['machine']['cpu_count']} CPUs)", ("area", "count", "value"),
                summary_rows(res))
    print(f"wrote {out / 'soak.json'} and {out / 'soak.md'}")
    return 1 if any(res["must_be_zero"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

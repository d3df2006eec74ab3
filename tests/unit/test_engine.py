"""The stage engine on fake stages (tests/unit/fake_stages.py): freshness, evidence, markers, lock, logs.

Run: .venv/bin/python -m pytest -q tests/unit/test_engine.py
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from pipeline import engine, evidence as ev
from pipeline.engine import SkipStage, StageFailed
from pipeline.settings import REPO, load_config
from tests.unit import fake_stages
from tests.unit.fake_stages import CALLS, BEHAVIOUR, OUTPUT_TEXT, evidence_rel

SCRIPT = Path(fake_stages.__file__)


class Harness:
    """The fake registry on a tiny-tier config rooted at tmp_path, with a console we can read."""

    def __init__(self, root: Path, data: Path, registry):
        self.root, self.data, self.registry = root, data, registry
        self.by_name = registry.by_name
        self.out = io.StringIO()
        self.console = Console(file=self.out, width=250, highlight=False)
        self.cfg = load_config()

    def run(self, *targets, overrides=(), force=False) -> int:
        if overrides:
            self.cfg = load_config(overrides=list(overrides))
        return engine.run(list(targets), self.cfg, self.console, self.registry, force=force)

    def doc(self, name: str) -> dict | None:
        return ev.read_json(self.root / evidence_rel(name))

    def status(self, name: str) -> str:
        stage = self.by_name[name]
        return engine.status_of(stage, self.cfg, engine.fingerprint(stage, self.cfg, self.registry)[0])

    def marker(self, name: str) -> Path:
        return engine.marker_path(self.by_name[name], self.cfg)

    def said(self) -> str:
        return self.out.getvalue()


@pytest.fixture
def fake(tiny_env):
    data = tiny_env / "data.txt"
    data.write_text("row 1\n")
    return Harness(tiny_env, data, fake_stages.install(data))


def script(h: Harness, behaviour: str, times: int = 1, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(h.root), str(h.data), behaviour, str(times)],
                            cwd=REPO, env=env, text=True, **popen)


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, limit: float = 60.0):
    """Poll until predicate() is true; fail (not hang) when the helper process dies or never gets there."""
    deadline = time.monotonic() + limit
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"helper process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


# --- freshness ------------------------------------------------------------------------------------
def test_first_run_writes_ok_evidence_that_validates(fake):
    assert fake.run("fake_a") == 0
    doc = fake.doc("fake_a")
    assert doc["status"] == "ok" and doc["skipped"] is False and doc["reason"] is None
    assert doc["answer"] == 42 and doc["model_tier"] == "tiny" and doc["stage"] == "fake_a"
    assert doc["outputs"] == {"out/fake_a.txt": ev.sha256_file(fake.root / "out/fake_a.txt")}
    assert doc["inputs"] == {"data.txt": ev.sha256_file(fake.data)}   # inside the root: relative to it
    assert ev.validate("fake_a", doc) == []
    assert not fake.marker("fake_a").exists()
    assert fake.status("fake_a") == "ok"


def test_second_run_is_up_to_date_and_does_not_call_the_stage(fake):
    assert fake.run("fake_a") == 0
    first = fake.doc("fake_a")
    assert fake.run("fake_a") == 0
    assert CALLS["fake_a"] == 1
    assert "fake_a: up to date" in fake.said()
    assert fake.doc("fake_a") == first


def test_force_reruns_the_named_stage_only(fake):
    fake.run("fake_b")
    fake.run("fake_b", force=True)
    assert dict(CALLS) == {"fake_a": 1, "fake_b": 2}


def test_force_all_reruns_every_stage(fake):
    fake.run("all")
    fake.run("all", force=True)
    assert dict(CALLS) == {"fake_a": 2, "fake_b": 2, "fake_c": 2}


def test_an_always_run_stage_is_never_up_to_date(fake):
    fake.registry = fake_stages.registry(fake.data, fake_a={"always_run": True})
    fake.run("fake_a")
    fake.run("fake_a")
    assert CALLS["fake_a"] == 2


def test_a_change_in_a_fingerprinted_section_reruns_and_elsewhere_does_not(fake):
    fake.run("fake_a")
    fake.run("fake_a", overrides=["judge.model=other-judge"])    # fake_a fingerprints only `sft`
    assert CALLS["fake_a"] == 1
    fake.run("fake_a", overrides=["sft.learning_rate=0.001"])
    assert CALLS["fake_a"] == 2
    assert fake.doc("fake_a")["fingerprint"] == engine.fingerprint(fake.by_name["fake_a"], fake.cfg, fake.registry)[0]


def test_a_changed_input_file_reruns(fake):
    fake.run("fake_a")
    assert fake.status("fake_a") == "ok"
    fake.data.write_text("row 1\nrow 2\n")
    assert fake.status("fake_a") == "stale"
    fake.run("fake_a")
    assert CALLS["fake_a"] == 2
    assert fake.doc("fake_a")["inputs"] == {"data.txt": ev.sha256_file(fake.data)}


def test_an_upstream_rerun_reruns_downstream(fake):
    assert fake.run("fake_c") == 0
    assert dict(CALLS) == {"fake_a": 1, "fake_b": 1, "fake_c": 1}
    fake.run("fake_c", overrides=["sft.learning_rate=0.001"])   # only fake_a's own section changed
    assert dict(CALLS) == {"fake_a": 2, "fake_b": 2, "fake_c": 2}
    OUTPUT_TEXT["fake_a"] = "different output\n"                # same config, new upstream output
    fake.run("fake_a", force=True)
    assert fake.status("fake_b") == "stale"
    fake.run("fake_c")
    assert dict(CALLS) == {"fake_a": 3, "fake_b": 3, "fake_c": 3}
    fake.run("fake_c")
    assert dict(CALLS) == {"fake_a": 3, "fake_b": 3, "fake_c": 3}


# --- failures and skips ---------------------------------------------------------------------------
def test_an_exception_writes_failed_evidence_exits_1_and_keeps_the_earlier_evidence(fake):
    fake.run("fake_a")
    earlier = fake.doc("fake_a")

    def boom(ctx):
        raise RuntimeError("disk on fire")
    BEHAVIOUR["fake_a"] = boom
    assert fake.run("fake_a", force=True) == 1
    doc = fake.doc("fake_a")
    assert doc["status"] == "failed" and doc["reason"] == "RuntimeError: disk on fire"
    assert ev.validate("fake_a", doc) == []
    assert ev.read_json(fake.root / "reports/fake/fake_a.previous.json") == earlier
    assert not fake.marker("fake_a").exists()
    assert fake.status("fake_a") == "failed"


def test_stage_failed_is_failed_with_its_reason(fake):
    def fail(ctx):
        raise StageFailed("no hardware plan: run gpu_check first")
    BEHAVIOUR["fake_a"] = fail
    assert fake.run("fake_a") == 1
    doc = fake.doc("fake_a")
    assert (doc["status"], doc["reason"]) == ("failed", "no hardware plan: run gpu_check first")


def test_a_stage_that_returns_nothing_fails_with_evidence(fake):
    BEHAVIOUR["fake_a"] = lambda ctx: None
    assert fake.run("fake_a") == 1
    doc = fake.doc("fake_a")
    assert doc["status"] == "failed" and "dict" in doc["reason"]
    assert not fake.marker("fake_a").exists()


def test_downstream_of_a_failed_stage_is_not_run(fake):
    def boom(ctx):
        raise ValueError("bad")
    BEHAVIOUR["fake_b"] = boom
    assert fake.run("fake_c") == 1
    assert CALLS["fake_c"] == 0 and fake.doc("fake_c") is None
    assert "needs fake_b, whose status is failed" in fake.said()


def test_skip_writes_skipped_evidence(fake):
    def skip(ctx):
        raise SkipStage("no GPU with 18 GB here")
    BEHAVIOUR["fake_b"] = skip
    assert fake.run("fake_b") == 0
    doc = fake.doc("fake_b")
    assert (doc["status"], doc["skipped"], doc["reason"]) == ("skipped", True, "no GPU with 18 GB here")
    assert ev.validate("fake_b", doc) == []


def test_a_skipped_training_stage_fails_when_skips_are_not_allowed(fake):
    BEHAVIOUR["fake_b"] = fake_stages.skipping
    assert fake.run("fake_b", overrides=["runtime.allow_skip_training=false"]) == 1
    doc = fake.doc("fake_b")
    assert (doc["status"], doc["skipped"]) == ("failed", False)
    assert "no GPU here" in doc["reason"] and "ALLOW_SKIP_TRAINING=false" in doc["reason"]
    assert ev.validate("fake_b", doc) == []


def test_a_non_training_stage_may_skip_even_when_training_skips_are_not_allowed(fake):
    BEHAVIOUR["fake_a"] = fake_stages.skipping
    assert fake.run("fake_a", overrides=["runtime.allow_skip_training=false"]) == 0
    assert fake.doc("fake_a")["status"] == "skipped"


def test_downstream_of_a_skipped_stage_is_skipped_naming_it(fake):
    BEHAVIOUR["fake_b"] = fake_stages.skipping
    assert fake.run("fake_c") == 0
    doc = fake.doc("fake_c")
    assert doc["status"] == "skipped" and "fake_b" in doc["reason"] and "no GPU here" in doc["reason"]
    assert CALLS["fake_c"] == 0
    assert ev.validate("fake_c", doc) == []


# --- interrupted runs -----------------------------------------------------------------------------
def test_a_leftover_marker_means_incomplete_and_the_next_run_reruns(fake):
    fake.run("fake_a")
    evidence_file = fake.root / evidence_rel("fake_a")
    ev.atomic_write_json(fake.marker("fake_a"), {"stage": "fake_a", "pid": 1})   # as a killed run leaves it
    os.replace(evidence_file, evidence_file.with_suffix(".previous.json"))
    assert fake.status("fake_a") == "incomplete"
    engine.print_table(fake.cfg, fake.console, fake.registry)
    assert any("fake_a" in line and "incomplete" in line for line in fake.said().splitlines())
    assert fake.run("fake_a") == 0
    assert CALLS["fake_a"] == 2 and fake.status("fake_a") == "ok" and not fake.marker("fake_a").exists()


def test_a_marker_wins_over_ok_evidence(fake):
    fake.run("fake_a")
    ev.atomic_write_json(fake.marker("fake_a"), {"stage": "fake_a", "pid": 1})
    assert fake.status("fake_a") == "incomplete"
    fake.run("fake_a")
    assert CALLS["fake_a"] == 2


def test_sigkill_mid_stage_leaves_incomplete_then_the_next_run_takes_the_lock_and_reruns(fake):
    proc = script(fake, "sleep_forever", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(fake.marker("fake_a").exists, "the stage to start", proc)
        wait_for(lambda: (fake.root / ".pipeline.lock").read_text().strip() == str(proc.pid), "the lock", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert fake.status("fake_a") == "incomplete"
    assert fake.doc("fake_a") is None
    assert fake.run("fake_a") == 0
    assert f"took over the lock left by PID {proc.pid}" in fake.said()
    assert CALLS["fake_a"] == 1 and fake.doc("fake_a")["status"] == "ok"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_stage_is_recorded_as_interrupted_and_the_console_says_how_to_resume(fake, sig, code):
    """Issue 14 §5: SIGTERM (a host's shutdown, `kill`) killed the process with no word and no record; SIGINT
    printed a traceback. Both: the marker is kept and says which signal, one line says how to resume."""
    proc = script(fake, "sleep_forever", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(fake.marker("fake_a").exists, "the stage to start", proc)
        wait_for(lambda: "fake_a is sleeping" in (fake.root / "reports/logs/fake_a_full.log").read_text()
                 if (fake.root / "reports/logs/fake_a_full.log").is_file() else False, "the stage to run", proc)
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    text = out
    assert proc.returncode == code, text
    assert "Traceback" not in text
    assert f"interrupted by {sig.name}" in text and "run the same command again" in text
    marker = json.loads(fake.marker("fake_a").read_text())
    assert marker["interrupted"] == sig.name and fake.status("fake_a") == "incomplete"
    assert fake.doc("fake_a") is None                                 # nothing marked ok, nothing failed either
    assert fake.run("fake_a") == 0 and fake.doc("fake_a")["status"] == "ok"


# --- the lock -------------------------------------------------------------------------------------
HOLD_LOCK = """
import sys, time
from pathlib import Path
from rich.console import Console
from pipeline.engine import pipeline_lock
with pipeline_lock(Path(sys.argv[1]), Console()):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_pipeline_on_the_same_root_is_refused_naming_the_pid(fake):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(fake.root)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as refused:
            fake.run("fake_a")
        assert f"PID {holder.pid}" in str(refused.value) and str(fake.root) in str(refused.value)
        assert CALLS["fake_a"] == 0 and fake.doc("fake_a") is None
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    assert fake.run("fake_a") == 0          # the holder died: its flock went with it


def test_a_stale_lock_file_is_taken_over_with_a_warning(fake):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (fake.root / ".pipeline.lock").write_text(f"{dead.pid}\n")
    assert fake.run("fake_a") == 0
    assert f"warning: took over the lock left by PID {dead.pid}" in fake.said()
    assert (fake.root / ".pipeline.lock").read_text() == ""      # released at the end


def test_the_lock_is_released_after_a_run(fake):
    fake.run("fake_a")
    with engine.pipeline_lock(fake.root, fake.console):
        pass
    assert "warning" not in fake.said()


# --- tampering, logs, atomic writes ---------------------------------------------------------------
@pytest.mark.parametrize("tamper", ["edit", "delete"])
def test_a_tampered_output_is_detected_and_rerun(tamper, fake):
    fake.run("fake_a")
    out = fake.root / "out/fake_a.txt"
    out.write_text("edited by hand\n") if tamper == "edit" else out.unlink()
    assert fake.status("fake_a") == "tampered"
    engine.print_table(fake.cfg, fake.console, fake.registry)
    assert any("fake_a" in line and "tampered" in line for line in fake.said().splitlines())
    fake.run("fake_a")
    assert CALLS["fake_a"] == 2 and fake.status("fake_a") == "ok"
    assert out.read_text() == "fake_a output\n"


def test_the_log_gets_stdout_and_stderr_of_each_attempt_under_a_header(fake):
    proc = script(fake, "noisy", times=2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    log = (fake.root / "reports/logs/fake_a_full.log").read_text()
    assert log.count("===== fake_a attempt at") == 2
    for line in ("line on stdout from print()", "line on stderr from print()", "line from a child process",
                 "line written to fd 2"):
        assert log.count(line) == 2, line
    assert "line from a child process" in stdout       # still on the console too


def test_no_temp_files_are_left_behind(fake):
    BEHAVIOUR["fake_b"] = fake_stages.skipping
    fake.run("fake_c")
    fake.run("fake_a", force=True)
    leftovers = [p for p in fake.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert not list((fake.root / "reports/.incomplete").iterdir())


def test_a_failed_evidence_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "reports/x.json"
    ev.atomic_write_json(target, {"status": "ok"})

    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(ev.os, "replace", crash)
    with pytest.raises(OSError):
        ev.atomic_write_json(target, {"status": "failed"})
    assert json.loads(target.read_text()) == {"status": "ok"}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


# --- planning and listing -------------------------------------------------------------------------
def test_plan_adds_needs_in_registry_order_and_names_unknown_stages(fake):
    assert [s.name for s in fake.registry.order(["fake_c"])] == ["fake_a", "fake_b", "fake_c"]
    assert [s.name for s in fake.registry.order(["all"])] == ["fake_a", "fake_b", "fake_c"]
    with pytest.raises(SystemExit, match="unknown stage 'fake_z'.*fake_a, fake_b, fake_c"):
        fake.registry.order(["fake_z"])


def test_ls_shows_each_status(fake):
    BEHAVIOUR["fake_c"] = fake_stages.skipping
    fake.run("fake_c")
    fake.data.write_text("new data\n")
    fake.out.seek(0), fake.out.truncate()
    engine.print_table(fake.cfg, fake.console, fake.registry)
    rows = {line.split("│")[1].strip(): line for line in fake.said().splitlines() if "│ fake_" in line}
    assert "stale" in rows["fake_a"] and "ok" in rows["fake_b"] and "skipped" in rows["fake_c"]


def test_cli_ls_lists_every_registered_stage(tiny_env):
    from pipeline.stages import REGISTRY
    STAGES = REGISTRY.stages
    env = {**os.environ, "COLUMNS": "250"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "ls"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "│" in line]
    listed = [line.split("│")[1].strip() for line in rows]
    assert [s.name for s in STAGES] == [n for n in listed if n in {s.name for s in STAGES}]
    assert all("missing" in line for line in rows if line.split("│")[1].strip() in {s.name for s in STAGES})
    assert "tier tiny" in done.stdout


def test_a_reason_with_brackets_is_printed_not_parsed_as_markup(tmp_path):
    """A library error such as gloo's '[/__w/pytorch/.../pair.cc:553] Connection closed' crashed rich's markup
    parser in the engine's status line, so the stage never wrote its failed evidence."""
    import io
    from rich.console import Console
    from pipeline import engine
    from pipeline.settings import load_config
    cfg = load_config(env={"MODEL_TIER": "tiny", "PIPELINE_ROOT": str(tmp_path)})
    stage = engine.Stage("gpu_check", "reports/x.json")
    console = Console(file=io.StringIO(), width=300)
    reason = "RuntimeError: [/__w/pytorch/third_party/gloo/pair.cc:553] Connection closed by peer"
    engine._finish(stage, cfg, console, "0" * 64, {}, engine.now(), engine.StageFailed(reason))
    assert "[/__w/pytorch/third_party/gloo/pair.cc:553]" in console.file.getvalue()


def test_a_machine_dependent_stage_reruns_on_another_machine_and_its_downstream_stays_fresh(fake):
    """gpu_check is up to date while the machine is the same (no torch import, no probe); on another boot/GPU it
    probes again, and what depends on it is not retrained for that alone."""
    here = {"boot": "A"}
    fake.registry = fake_stages.registry(fake.data, fake_a={"machine": lambda cfg: dict(here)})
    fake.run("fake_b")
    fake.run("fake_b")
    assert dict(CALLS) == {"fake_a": 1, "fake_b": 1}
    here["boot"] = "B"
    fake.run("fake_b")
    assert dict(CALLS) == {"fake_a": 2, "fake_b": 1}
    assert fake.doc("fake_a")["machine_sha256"] == ev.sha256_json({"boot": "B"})
# --- where a stage runs: launch.runner_for, chosen by the engine from the declaration and the plan -----------
class FakeLaunch:
    """Stands in for launch.Accelerate: records the stage and the process count, calls prepare, no launch."""
    launched: list = []

    def __init__(self, n: int):
        self.n = n

    def run(self, stage, ctx) -> dict:
        if stage.prepare is not None:
            stage.prepare(ctx)
        FakeLaunch.launched.append((stage.name, self.n))
        return {"answer": 7, "ran": "launched"}


def runner_registry(plan: dict):
    from pipeline.core import Registry, Stage

    def probe(ctx):
        return {"plan": plan}

    def in_process(ctx):
        fake_stages.CALLS[ctx.name] += 1
        return {"answer": 1, "ran": "in process"}

    def prepare(ctx):
        fake_stages.CALLS[f"{ctx.name}.prepare"] += 1
    return Registry([
        Stage("gpu_check", evidence_rel("probe"), schema="fake_probe", run=probe),
        Stage("fake_train", evidence_rel("fake_train"), needs=("gpu_check",), reads=("runtime.nproc",),
              distributed=True, prepare=prepare, run=in_process),
        Stage("fake_plain", evidence_rel("fake_plain"), needs=("gpu_check",), run=in_process),
    ])


CPU_PLAN = {"device": "cpu", "n_gpus": 0, "feasible": True, "precision": "fp32"}


@pytest.mark.parametrize("nproc, plan, launched", [
    (1, CPU_PLAN, []),                                                       # NPROC=1: in process
    (2, CPU_PLAN, [("fake_train", 2)]),                                      # a CPU: NPROC ranks
    (3, {**CPU_PLAN, "device": "cuda", "n_gpus": 2}, [("fake_train", 2)]),   # CUDA: capped at the plan's GPUs
    (2, {**CPU_PLAN, "device": "cuda", "n_gpus": 1}, []),                    # one GPU: in process
    (2, {**CPU_PLAN, "feasible": False}, []),                                # the stage's own gate skips it
])
def test_the_engine_runs_a_distributed_stage_through_the_launcher_only_with_several_processes(
        tiny_env, nproc, plan, launched):
    from pipeline import launch
    registry = runner_registry(plan)
    fake_stages.CALLS.clear()
    FakeLaunch.launched = []
    cfg = load_config(overrides=[f"runtime.nproc={nproc}"])
    console = Console(file=io.StringIO(), width=250)
    for name in ("gpu_check", "fake_train", "fake_plain"):
        assert engine.run_stage(registry[name], cfg, console, registry, launcher=FakeLaunch) == "ok"
    train = ev.read_json(tiny_env / evidence_rel("fake_train"))
    plain = ev.read_json(tiny_env / evidence_rel("fake_plain"))
    assert FakeLaunch.launched == launched
    assert train["ran"] == ("launched" if launched else "in process")
    assert fake_stages.CALLS["fake_train"] == (0 if launched else 1)          # run() once, in one place
    assert fake_stages.CALLS["fake_train.prepare"] == (1 if launched else 0)  # prepare: only before a launch
    assert plain["ran"] == "in process" and fake_stages.CALLS["fake_plain"] == 1   # not distributed: here
    ctx = engine.make_ctx(registry["fake_plain"], cfg, console, registry)
    assert launch.runner_for(registry["fake_plain"], ctx, FakeLaunch) is launch.IN_PROCESS
    assert "runtime.nproc" not in plain["config_read"]   # the choice for a plain stage reads no config


def test_the_default_launcher_is_accelerate(tiny_env):
    from pipeline import launch
    registry = runner_registry(CPU_PLAN)
    cfg = load_config(overrides=["runtime.nproc=2"])
    console = Console(file=io.StringIO(), width=250)
    engine.run_stage(registry["gpu_check"], cfg, console, registry)
    ctx = engine.make_ctx(registry["fake_train"], cfg, console, registry)
    runner = launch.runner_for(registry["fake_train"], ctx)
    assert isinstance(runner, launch.Accelerate) and runner.n == 2


def test_a_stage_nobody_asked_for_is_skipped_once_and_then_up_to_date(tiny_env):
    """Stage.requested (the preflight on tiny/demo): the engine records the skip with its reason, and a re-run
    leaves it alone while the fingerprint holds and nobody asks; asking (preflight.enabled=true) makes it run."""
    import io as _io
    import json as _json

    from rich.console import Console as _Console

    from pipeline import engine as _engine
    from pipeline.settings import load_config
    from pipeline.stages import REGISTRY
    out, stage = _io.StringIO(), REGISTRY["preflight"]
    cfg = load_config()
    assert _engine.run_stage(stage, cfg, _Console(file=out), REGISTRY) == "skipped"
    path = tiny_env / "reports/migration/preflight.json"
    doc = _json.loads(path.read_text())
    assert doc["reason_code"] == "not_requested" and "make preflight" in doc["reason"]
    assert _engine.run_stage(stage, cfg, _Console(file=out), REGISTRY) == "skipped"
    assert "up to date (skipped: not requested)" in out.getvalue()
    assert _json.loads(path.read_text())["finished_at"] == doc["finished_at"]   # not written again
    assert stage.requested(load_config(overrides=["preflight.enabled=true"])) is None

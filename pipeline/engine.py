"""The stage engine: fingerprint -> skip when fresh -> marker -> run -> validate -> atomic evidence.

A stage is a module in pipeline/stages with its declaration `STAGE`, `run(ctx) -> dict` and `checks`; the
engine is handed a `core.Registry` of them (pipeline/stages/__init__.py builds the real one). Idempotence lives
here, not in Make timestamps. The fingerprint is made from the stage's declaration, and the stage's context
(core.ScopedCfg) refuses any read outside it, so "up to date" means nothing the stage reads has changed.
"""
from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pipeline import evidence as ev
from pipeline import launch, seeds
from pipeline.core import Ctx, Registry, ScopedCfg, SkipStage, Stage, StageFailed, config_part, stage_config
from pipeline.settings import REPO, Config, secret

from pipeline.provenance import git_commit, now, versions

__all__ = ["Ctx", "Registry", "SkipStage", "Stage", "StageFailed", "run", "run_stage", "fingerprint", "status_of",
           "git_commit", "now", "versions"]

# --- fingerprint and freshness -------------------------------------------------------------------
def input_files(stage: Stage, cfg: Config) -> list[Path]:
    """The files the stage declares (its `inputs`), computed from the keys it declares."""
    if stage.inputs is None:
        return []
    return [Path(p) for p in stage.inputs(ScopedCfg(cfg, stage))]


def declared_config(stage: Stage, cfg: Config) -> dict:
    """The fingerprinted part of the config: exactly the keys the stage declares it reads, paths inside the root
    or the repository relative to it (a moved root or clone stays up to date)."""
    run_cfg = stage_config(stage, cfg)   # a seed replicate's own runtime.seed
    return ev.portable({key: config_part(run_cfg, key) for key in sorted(stage.reads)}, Path(cfg.root), REPO)


def fingerprint(stage: Stage, cfg: Config, registry: Registry) -> tuple[str, dict]:
    root = Path(cfg.root)
    inputs = {_rel(p, root): ev.sha256_file(p) for p in input_files(stage, cfg) if p.is_file()}
    upstream = {}
    for need in stage.needs:
        up = ev.read_json(root / registry[need].evidence(cfg)) or {}
        upstream[need] = {"status": up.get("status"), "fingerprint": up.get("fingerprint"), "outputs": up.get("outputs")}
    material = {"stage": stage.name, "tier": cfg.tier, "config": declared_config(stage, cfg), "inputs": inputs,
                "upstream": upstream, "versions": versions()}
    if stage.content is not None:
        material["content"] = stage.content(cfg)
    return ev.sha256_json(material), inputs


def _rel(p: Path, root: Path) -> str:
    """Files in the output root or the repository by their path relative to it, so a moved root or clone keeps its
    fingerprints."""
    full = p.resolve()
    return ev.portable(str(full), root, REPO) if full.is_relative_to(root) or full.is_relative_to(REPO) else str(p)


def marker_path(stage: Stage, cfg: Config) -> Path:
    return Path(cfg.root) / "reports" / ".incomplete" / f"{stage.name}.marker"


def status_of(stage: Stage, cfg: Config, fp: str | None = None) -> str:
    """missing | incomplete | ok | skipped | failed | dry_run | stale | tampered."""
    if marker_path(stage, cfg).exists():
        return "incomplete"
    doc = ev.read_json(Path(cfg.root) / stage.evidence(cfg))
    if not isinstance(doc, dict):
        return "missing"
    status = doc.get("status", "missing")
    if status != stage.done_status:
        return status
    if fp is not None and doc.get("fingerprint") != fp:
        return "stale"
    if ev.hash_paths(Path(cfg.root), doc.get("outputs", {}).keys()) != doc.get("outputs", {}):
        return "tampered"
    return status


# --- lock and log capture ------------------------------------------------------------------------
@contextlib.contextmanager
def pipeline_lock(root: Path, console):
    """One pipeline per output root. flock dies with its process, so a dead holder's lock is taken over."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".pipeline.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise SystemExit(f"another pipeline (PID {holder}) is running on {root} (lock {path}): "
                         "wait for it to finish or stop it; two runs on one output root would corrupt each other")
    fh.seek(0)
    old = fh.read().strip()
    if old and old != str(os.getpid()):
        console.print(f"[yellow]warning:[/] took over the lock left by PID {old}, which is no longer running")
    fh.seek(0), fh.truncate(), fh.write(str(os.getpid())), fh.flush()
    try:
        yield
    finally:
        fh.seek(0), fh.truncate(), fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def tee_output(log_path: Path, header: str):
    """Copy fd 1 and 2 (Python, C code and subprocesses alike) into log_path as well as the console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab", buffering=0)
    log.write(f"\n===== {header} =====\n".encode())
    faulthandler.enable(file=log, all_threads=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 1), os.dup2(w, 2)
    os.close(w)

    def pump():
        while chunk := os.read(r, 65536):
            log.write(chunk)
            os.write(saved[0], chunk)
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)   # closes the pipe's last writer -> pump ends
        t.join(timeout=10)
        os.close(r), os.close(saved[0]), os.close(saved[1])
        faulthandler.enable(file=sys.__stderr__)
        log.close()


# --- running -------------------------------------------------------------------------------------
def run_stage(stage: Stage, cfg: Config, console, registry: Registry, force: bool = False,
              launcher=None, stop: str | None = None) -> str:
    """`launcher(n)`: the runner for a distributed stage with n > 1 processes (default launch.Accelerate).
    `stop`: why a guard stops the run before this stage (a budget); it fails here unless it is up to date."""
    root = Path(cfg.root)
    fp, inputs = fingerprint(stage, cfg, registry)
    current = status_of(stage, cfg, fp)
    machine = ev.sha256_json(stage.machine(cfg)) if stage.machine else None
    if machine and current == stage.done_status and _read_doc(stage, cfg).get("machine_sha256") != machine:
        current = "stale"   # another boot, GPU or build: probe again (downstream fingerprints do not move)
    if current == stage.done_status and not force and not stage.always_run:
        console.print(f"[green]✓ {stage.name}[/]: up to date")
        return "ok"
    if stage.requested is not None and (why := stage.requested(cfg)):
        doc = _read_doc(stage, cfg)
        if current == "skipped" and doc.get("reason_code") == "not_requested" and doc.get("fingerprint") == fp:
            console.print(f"[green]✓ {stage.name}[/]: up to date (skipped: not requested)")
            return "skipped"
        return _finish(stage, cfg, console, fp, inputs, now(), SkipStage(why, code="not_requested"))
    if stop:   # an earlier result is kept aside, as when it runs
        if (root / stage.evidence(cfg)).exists():
            os.replace(root / stage.evidence(cfg), (root / stage.evidence(cfg)).with_suffix(".previous.json"))
        return _finish(stage, cfg, console, fp, inputs, now(), StageFailed(stop, code="over_budget"))
    if current == "incomplete":
        console.print(f"[yellow]{stage.name}[/]: an earlier run did not finish (marker left); running it again")
    skipped_need = None
    for need in stage.needs:
        up = ev.read_json(root / registry[need].evidence(cfg)) or {}
        if up.get("status") == "skipped" and not stage.runs_after_skip:
            skipped_need = SkipStage(f"needs {need}, which was skipped: {up.get('reason')}")
        elif up.get("status") not in ("ok", "skipped", registry[need].done_status):
            console.print(f"[red]✗ {stage.name}[/]: not run: it needs {need}, whose status is {up.get('status', 'missing')}")
            return "blocked"
    console.rule(f"[bold]{stage.name}")
    evidence_file = root / stage.evidence(cfg)
    ev.atomic_write_json(marker_path(stage, cfg), {"stage": stage.name, "pid": os.getpid(), "started_at": now()})
    if evidence_file.exists():   # an earlier result is kept aside, never half-trusted
        os.replace(evidence_file, evidence_file.with_suffix(".previous.json"))
    if skipped_need:
        return _finish(stage, cfg, console, fp, inputs, now(), skipped_need)
    reads: set = set()
    started, t0 = now(), time.monotonic()
    _fresh_process_state()
    with tee_output(root / "reports" / "logs" / f"{stage.name}_full.log", f"{stage.name} attempt at {started} (pid {os.getpid()})"):
        try:
            ctx = make_ctx(stage, cfg, console, registry, fp, reads)   # where it runs: launch.runner_for
            result = launch.runner_for(stage, ctx, launcher or launch.Accelerate).run(stage, ctx)
            if not isinstance(result, dict):
                raise StageFailed(f"run() returned {type(result).__name__}, not a dict of evidence fields: "
                                  f"end pipeline/stages/{stage.name}.py's run() with `return {{...}}`")
        except (SkipStage, StageFailed) as exc:
            result = exc
        except KeyboardInterrupt as exc:   # SIGINT, or SIGTERM through _signals_interrupt: marker kept, says which
            name = str(exc) or "SIGINT"
            ev.atomic_write_json(marker_path(stage, cfg), {"stage": stage.name, "pid": os.getpid(), "started_at": started,
                                                           "interrupted": name, "interrupted_at": now()})
            console.print(f"[yellow]{stage.name} interrupted by {name}[/]: its marker is kept "
                          f"({marker_path(stage, cfg).relative_to(root)}); run the same command again to resume it "
                          "from its last checkpoint (finished stages are skipped)")
            raise
        except Exception as exc:  # noqa: BLE001 - any crash becomes failed evidence with its text
            import traceback
            traceback.print_exc()
            result = StageFailed(f"{type(exc).__name__}: {exc}")
    return _finish(stage, cfg, console, fp, inputs, started, result, time.monotonic() - t0, reads, machine)


def _read_doc(stage: Stage, cfg: Config) -> dict:
    doc = ev.read_json(Path(cfg.root) / stage.evidence(cfg))
    return doc if isinstance(doc, dict) else {}


def make_ctx(stage: Stage, cfg: Config, console, registry: Registry, fp: str = "", reads: set | None = None) -> Ctx:
    """The context a stage runs with: its declared config keys, files and upstream evidence, nothing more."""
    scoped = ScopedCfg(cfg, stage, inputs=input_files(stage, cfg), reads=reads)
    return Ctx(scoped, stage, console, registry, fp, read_evidence=ev.read_json, secrets=secret,
               read_advice=lambda name: fresh_evidence(registry[name], cfg, registry))


def fresh_evidence(stage: Stage, cfg: Config, registry: Registry) -> dict | None:
    """A stage's evidence when it is done and up to date with the config and its upstream now, else None."""
    return _read_doc(stage, cfg) if status_of(stage, cfg, fingerprint(stage, cfg, registry)[0]) == stage.done_status \
        else None


def _fresh_process_state() -> None:
    """Before a stage: the previous stage's models are collected (TRL's trainers hold cycles that only the cyclic
    GC frees) and the per-stage high-water marks (live models, CUDA peak) start from here."""
    from pipeline import models
    models.release()
    models.live_high_water(reset=True)
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.reset_peak_memory_stats()


def _finish(stage, cfg, console, fp, inputs, started, result, duration=0.0, reads: set | None = None,
            machine: str | None = None) -> str:
    root = Path(cfg.root)
    fields: dict = {}
    if isinstance(result, SkipStage):
        status, reason = "skipped", str(result)
        if stage.training and not cfg.runtime.allow_skip_training:
            status, reason = "failed", f"{reason} (ALLOW_SKIP_TRAINING=false: a skipped training stage is a failure)"
    elif isinstance(result, StageFailed):
        status, reason = "failed", str(result)
    else:
        fields = dict(result)
        status, reason = fields.pop("status", "ok"), fields.pop("reason", None)
    listed = fields.pop("outputs", []) or []
    missing = [p for p in listed if not (Path(p) if Path(p).is_absolute() else root / p).exists()]
    if missing and status == "ok":
        status, reason = "failed", f"the stage listed outputs it did not write: {', '.join(map(str, missing[:3]))}"
    outputs = ev.hash_paths(root, listed)
    inputs = {**inputs, **ev.hash_paths(root, fields.pop("inputs", []) or [])}
    doc = {"stage": stage.name, "status": status, "skipped": status == "skipped", "reason": reason,
           "started_at": started, "finished_at": now(), "duration_s": round(duration, 3), "git_commit": git_commit(),
           "config_hash": ev.sha256_json(declared_config(stage, cfg)), "fingerprint": fp,
           "config_read": sorted(reads or ()), **({"machine_sha256": machine} if machine else {}),
           "reason_code": getattr(result, "code", None),
           "versions": versions(), "inputs": inputs, "outputs": outputs, "model_tier": cfg.tier, **fields}
    errors = ev.validate(stage.schema or stage.name, doc)
    if errors:
        doc.update(status="failed", skipped=False, reason=f"evidence does not match its schema: {errors[0]}",
                   schema_errors=errors[:20])
    ev.atomic_write_json(root / stage.evidence(cfg), doc)
    marker_path(stage, cfg).unlink(missing_ok=True)
    colour = {"ok": "green", "skipped": "yellow", "dry_run": "cyan"}.get(doc["status"], "red")
    from rich.markup import escape   # a reason quotes library errors, which may contain [brackets]
    console.print(f"[{colour}]{doc['status']}[/] {stage.name}" + (f": {escape(doc['reason'])}" if doc["reason"] else "")
                  + f"  ({stage.evidence(cfg)})")
    return doc["status"]


def run(targets: list[str], cfg: Config, console, registry: Registry, force: bool = False,
        with_needs: bool = True) -> int:
    """_run, with SIGINT and SIGTERM ending it as the shell would (exit 130 / 143) once the interrupted stage has
    recorded it in its marker and said how to resume: no traceback."""
    try:
        with _signals_interrupt():
            return _run(targets, cfg, console, registry, force, with_needs)
    except KeyboardInterrupt as exc:
        return 143 if str(exc) == "SIGTERM" else 130


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM (a host shutting down, `kill`) and SIGINT (Ctrl-C) raise KeyboardInterrupt("SIGTERM" / "SIGINT"), so
    the stage records it and the lock and the log capture are released; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    # SIGINT too: a shell starts a background job with SIGINT ignored, and Python then never raises on it
    before = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run(targets: list[str], cfg: Config, console, registry: Registry, force: bool = False,
         with_needs: bool = True) -> int:
    """Run the targets and their needs. Under DRY_RUN=true only the stages that train nothing run (the probe,
    the dry run); every other stage of the plan is listed with what it would do, and nothing of it is written."""
    dry = cfg.runtime.dry_run
    registry = seeds.expand(registry, cfg, console)   # SEEDS: each training stage once more per extra seed
    order = registry.order(targets, dry_run=dry, with_needs=with_needs, cfg=cfg)
    results = {}
    forced = [s.name for s in order] if targets == ["all"] else targets   # --force: the named stages, or all
    guards: list[Stage] = []   # stages whose guard decides, once they are ok, whether each later stage may start
    with pipeline_lock(Path(cfg.root), console):
        for i, stage in enumerate(order):
            if dry and not stage.in_dry_run:
                fp, _ = fingerprint(stage, cfg, registry)
                current = status_of(stage, cfg, fp)
                results[stage.name] = "dry_run"
                what = "up to date, would be skipped" if current == stage.done_status else f"{current}: would run"
                console.print(f"[cyan]dry run[/] {stage.name}: {what} (DRY_RUN=true: nothing trained or written)")
                continue
            done, todo = [s.name for s in order[:i]], [s.name for s in order[i:]]
            stop = next(filter(None, (g.guard(cfg, registry, done, todo) for g in guards)), None)
            results[stage.name] = run_stage(stage, cfg, console, registry, force=force and stage.name in forced,
                                            stop=stop)
            if stop and results[stage.name] == "failed":
                console.print(f"[red]stopped[/] before {stage.name}: nothing from it on runs (its evidence says why)")
                break
            if stage.stops_run and results[stage.name] == "failed":
                console.print(f"[red]stopped[/] after {stage.name}: nothing after it runs (its evidence says why)")
                break
            if stage.guard and results[stage.name] == "ok":
                guards.append(stage)
    if len(order) > 1:
        print_table(cfg, console, registry, order)
    bad = [n for n, s in results.items() if s not in ("ok", "skipped", "dry_run")]
    return 1 if bad else 0


def print_table(cfg: Config, console, registry: Registry, order: list[Stage] | None = None) -> None:
    from rich.markup import escape
    from rich.table import Table
    table = Table(title=f"pipeline status (tier {cfg.tier}, root {cfg.root})")
    for col in ("stage", "needs", "status", "reason", "evidence"):
        table.add_column(col)
    for stage in order or registry.stages:
        fp, _ = fingerprint(stage, cfg, registry)
        st = status_of(stage, cfg, fp)
        doc = ev.read_json(Path(cfg.root) / stage.evidence(cfg)) or {}
        reason = escape((doc.get("reason") or "")[:80]) if st not in ("ok", "missing") else ""
        table.add_row(stage.name, ",".join(stage.needs), st, reason, stage.evidence(cfg))
    console.print(table)

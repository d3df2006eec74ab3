"""Where a stage runs: the engine asks `runner_for(stage, ctx)` and calls `runner.run(stage, ctx)`, which
hands it one result (the evidence dict, or the SkipStage/StageFailed it raises).

- `InProcess`: `stage.run(ctx)` here. Every stage that does not declare `distributed=True`, and every one
  under NPROC=1 (or a plan with one GPU).
- `Accelerate(n)`: a `distributed` stage under NPROC > 1. It calls the stage's `prepare(ctx)` once here (the
  skip check, the base model built once rather than by every rank), writes the whole config, and runs, from
  the repository root,

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \
        --mixed_precision {no|fp16|bf16} --main_process_port P \
        -m pipeline.train_worker <stage> <fp> <config> <result>

  (accelerate's torchrun launcher; `--cpu` would need mpirun, so a CPU run uses the same launcher and each
  rank's TrainingArguments(use_cpu=True) makes accelerate choose gloo). Each rank calls the same
  `stage.run(ctx)` once; training touches ranks only through accelerate's PartialState (pipeline/training.py);
  rank 0 writes the result. A rank that runs out of memory stops them all (pipeline.ranks.RankOOM): the
  launch is repeated with half the batch, and the relaunches are put in front of the evidence with the
  `distributed` block.

Imports no training code: the batch rules and the rank signals are in pipeline/ranks.py.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from pipeline import evidence as ev
from pipeline import preflight_kit, ranks
from pipeline.core import SkipStage, Stage, StageFailed
from pipeline.settings import REPO, config_from_dict

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


__all__ = ["config_from_dict"]   # the workers' config (pipeline.settings.config_from_dict)


def processes(cfg, plan: dict) -> int:
    """One process per planned GPU (the plan already capped NPROC at the GPUs visible); on a CPU, NPROC."""
    return min(cfg.runtime.nproc, plan["n_gpus"]) if plan["device"] == "cuda" else cfg.runtime.nproc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(n: int, plan: dict, kind: str, fingerprint: str, config_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", MIXED_PRECISION[plan["precision"]], "--dynamo_backend", "no",
            "--main_process_port", str(free_port()),
            "-m", "pipeline.train_worker", kind, fingerprint, str(config_file), str(result_file)]


class InProcess:
    """The stage runs in this process."""

    def run(self, stage: Stage, ctx) -> dict:
        return stage.run(ctx)


class Accelerate:
    """The stage runs as n ranks under `accelerate launch`; rank 0's result comes back."""

    def __init__(self, n: int):
        self.n = n

    def run(self, stage: Stage, ctx) -> dict:
        if stage.prepare is not None:
            stage.prepare(ctx)   # once, here: a skip before launching anything, one model build
        cfg, plan, kind, n = ctx.cfg, ctx.plan, stage.name, self.n
        work = Path(cfg.cache_dir) / "launch" / kind
        work.mkdir(parents=True, exist_ok=True)
        config_file, result_file, oom_file = work / "config.json", work / "result.json", work / "oom.json"
        tc = getattr(cfg, kind)
        floor = stage.method.min_batch if stage.method else 1
        planned = ranks.first_batch(kind, tc.batch_size, tc.grad_acc, floor)
        first = preflight_kit.first_attempt(ctx.advice("preflight") if "preflight" in stage.advice else None, kind,
                                            planned)   # a fresh preflight's smaller batch, when it found one
        batch, grad_acc, retries = first[0], first[1], []
        while True:
            result_file.unlink(missing_ok=True)
            oom_file.unlink(missing_ok=True)
            # the whole config (the workers scope it again); only the batch changes
            run_cfg = config_from_dict(cfg.unscoped().to_dict())
            getattr(run_cfg, kind).batch_size, getattr(run_cfg, kind).grad_acc = batch, grad_acc
            ev.atomic_write_json(config_file, run_cfg.to_dict())
            cmd = command(n, plan, kind, ctx.fingerprint, config_file, result_file)
            ctx.log(f"launching {n} training processes ({plan['device']}): {' '.join(cmd[1:])}")
            rc = subprocess.run(cmd, cwd=REPO).returncode   # its output goes to this stage's log like ours
            oom = ev.read_json(oom_file)
            if not oom:
                break
            where = f"on rank {oom.get('rank')} of {n} at step {oom.get('step')}"
            batch, grad_acc = ranks.halved_after_oom(batch, grad_acc, len(retries), where, floor,
                                                     tc.max_oom_retries)
            retries.append({"attempt": len(retries) + 1, "batch_size": batch, "grad_acc": grad_acc,
                            "step": oom.get("step"), "error": f"rank {oom.get('rank')}: {oom.get('error')}",
                            "action": f"all {n} ranks stopped; relaunched with half the batch, resumed"})
            ctx.log(f"[yellow]rank {oom.get('rank')} ran out of memory at step {oom.get('step')}: relaunching "
                    f"all ranks with batch {batch} x accumulation {grad_acc}")
        outcome = ev.read_json(result_file) or {}
        cfg.reads.update(outcome.get("config_read", []))   # what rank 0 read, for the evidence's config_read
        if "skip" in outcome:
            raise SkipStage(outcome["skip"])
        if "failed" in outcome:
            raise StageFailed(f"rank 0 of {n}: {outcome['failed']}")
        if rc != 0 or "evidence" not in outcome:
            raise StageFailed(f"the {n}-process launch of {kind} exited with status {rc} without a result "
                              f"({result_file}): read reports/logs/{kind}_full.log for the failing rank")
        evidence = outcome["evidence"]
        if retries or first[:2] != planned[:2]:   # the ranks saw only their last launch: put the first in front
            evidence["oom_retries"] = retries + evidence.get("oom_retries", [])
            evidence["batch"] = {
                "requested": {"per_device": tc.batch_size, "grad_acc": tc.grad_acc},
                "attempts": [{"attempt": 1, "per_device": first[0], "grad_acc": first[1],
                              "reason": first[2]}]
                + [{"attempt": r["attempt"] + 1, "per_device": r["batch_size"], "grad_acc": r["grad_acc"],
                    "reason": f"out of memory at step {r['step']} ({r['error'][:80]})"} for r in retries]
                + evidence["batch"]["attempts"][1:]}
        return {**evidence, "distributed": {"nproc": n, **outcome["distributed"], "command": cmd[1:]}}


IN_PROCESS = InProcess()


def runner_for(stage: Stage, ctx, launcher=Accelerate):
    """The engine's choice from the declaration and the plan: `launcher(n)` for a distributed stage with n > 1
    processes, else in this process. `launcher` is injectable (tests hand a fake one)."""
    if not stage.distributed or ctx.cfg.runtime.nproc <= 1:
        return IN_PROCESS
    plan = ctx.plan
    if not plan.get("feasible", False):
        return IN_PROCESS                          # the stage's own gate skips it, with evidence
    n = processes(ctx.cfg, plan)
    if n <= 1:
        ctx.log(f"NPROC={ctx.cfg.runtime.nproc} but the plan has {plan['n_gpus']} GPU: "
                "training in this process")
        return IN_PROCESS
    return launcher(n)


if __name__ == "__main__":   # debugging aid: print the command for a stage
    print(json.dumps(command(2, {"precision": "fp32"}, sys.argv[1] if len(sys.argv) > 1 else "sft", "FP",
                             Path("config.json"), Path("result.json"))))

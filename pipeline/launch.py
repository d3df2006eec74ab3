"""Multi-process training (NPROC > 1): a training stage re-runs itself under `accelerate launch` (DDP).

A training stage's run() starts with `launch.maybe_distributed(ctx, kind)`. With nproc == 1 it returns None
and training happens in this process. Otherwise it runs, from the repository root,

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \
        --mixed_precision {no|fp16|bf16} --main_process_port P -m pipeline.train_worker <kind> <fp> <config> <result>

(accelerate's torchrun launcher; `--cpu` would need mpirun, so a CPU run uses the same launcher and each
rank's TrainingArguments(use_cpu=True) makes accelerate choose gloo), waits, and returns the evidence rank 0
wrote. Every rank trains; Trainer saves checkpoints on rank 0 only (args.should_save); the hooks below,
called from training.fit(), let rank 0 alone claim the output folder, copy the final and write evidence.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from pipeline import evidence as ev
from pipeline import training as T
from pipeline.core import SkipStage, StageFailed
from pipeline.settings import REPO, config_from_dict

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


class RankDone(Exception):
    """Raised on ranks > 0 once training is over; pipeline.train_worker catches it and exits 0."""


class RankOOM(Exception):
    """Raised on the rank that ran out of memory under DDP: it cannot retry alone (the other ranks would wait in
    their next collective until the NCCL timeout), so it exits, torchrun ends the group, and the parent relaunches
    every rank with half the batch. pipeline.train_worker writes `info` to oom.json beside the result."""

    def __init__(self, info: dict):
        super().__init__(f"out of memory at step {info.get('step')}")
        self.info = info


# --- hooks for training.fit(): no-ops in a single process ---------------------------------------------
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    dist = _dist()
    return dist is None or dist.get_rank() == 0


def wait_for_everyone() -> None:
    """Barrier: after trainer.train() every rank must see the checkpoint rank 0 just wrote before resuming."""
    if dist := _dist():
        dist.barrier()


def on_main_then_wait(fn, *args) -> None:
    """fn(*args) on rank 0 only (e.g. claiming the output folder), then a barrier."""
    if is_main_process():
        fn(*args)
    wait_for_everyone()


def oom_unless_alone(kind: str, failure: dict, batch: int, grad_acc: int) -> None:
    """In one process the caller retries in place; under DDP this rank stops and the parent retries them all."""
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        raise RankOOM({"kind": kind, "rank": dist.get_rank(), "batch_size": batch, "grad_acc": grad_acc, **failure})


def stop_unless_main() -> None:
    if not is_main_process():
        raise RankDone


# --- the launcher -------------------------------------------------------------------------------------
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


def maybe_distributed(ctx, kind: str) -> dict | None:
    """None when this process should train (nproc == 1); else launch N ranks and return rank 0's evidence."""
    cfg = ctx.cfg
    if cfg.runtime.nproc <= 1 or _dist() is not None:   # one process, or already a rank (train_worker)
        return None
    T.gate(ctx)                                   # skip here, before launching anything
    plan = ctx.plan
    n = processes(cfg, plan)
    if n <= 1:
        ctx.log(f"NPROC={cfg.runtime.nproc} but the plan has {plan['n_gpus']} GPU: training in this process")
        return None
    from pipeline import models
    models.base_for(cfg)  # build once, not per rank
    work = Path(cfg.cache_dir) / "launch" / kind
    work.mkdir(parents=True, exist_ok=True)
    config_file, result_file, oom_file = work / "config.json", work / "result.json", work / "oom.json"
    tc = getattr(cfg, kind)
    first = T.first_batch(kind, tc.batch_size, tc.grad_acc)
    batch, grad_acc, retries = first[0], first[1], []
    while True:
        result_file.unlink(missing_ok=True)
        oom_file.unlink(missing_ok=True)
        run_cfg = config_from_dict(cfg.unscoped().to_dict())   # the workers see it scoped again; only the batch changes
        getattr(run_cfg, kind).batch_size, getattr(run_cfg, kind).grad_acc = batch, grad_acc
        ev.atomic_write_json(config_file, run_cfg.to_dict())
        cmd = command(n, plan, kind, ctx.fingerprint, config_file, result_file)
        ctx.log(f"launching {n} training processes ({plan['device']}): {' '.join(cmd[1:])}")
        rc = subprocess.run(cmd, cwd=REPO).returncode   # its output goes to this stage's log like ours
        oom = ev.read_json(oom_file)
        if not oom:
            break
        batch, grad_acc = T.halved_after_oom(kind, tc, batch, grad_acc, len(retries),
                                             f"on rank {oom.get('rank')} of {n} at step {oom.get('step')}")
        retries.append({"attempt": len(retries) + 1, "batch_size": batch, "grad_acc": grad_acc, "step": oom.get("step"),
                        "error": f"rank {oom.get('rank')}: {oom.get('error')}",
                        "action": f"all {n} ranks stopped; relaunched with half the batch, resumed"})
        ctx.log(f"[yellow]rank {oom.get('rank')} ran out of memory at step {oom.get('step')}: relaunching all ranks "
                f"with batch {batch} x accumulation {grad_acc}")
    outcome = ev.read_json(result_file) or {}
    if "skip" in outcome:
        raise SkipStage(outcome["skip"])
    if "failed" in outcome:
        raise StageFailed(f"rank 0 of {n}: {outcome['failed']}")
    if rc != 0 or "evidence" not in outcome:
        raise StageFailed(f"the {n}-process launch of {kind} exited with status {rc} without a result "
                          f"({result_file}): read reports/logs/{kind}_full.log for the failing rank")
    evidence = outcome["evidence"]
    if retries:   # the ranks saw only their last launch: put the relaunches in front
        evidence["oom_retries"] = retries + evidence.get("oom_retries", [])
        evidence["batch"] = {"requested": {"per_device": tc.batch_size, "grad_acc": tc.grad_acc},
                             "attempts": [{"attempt": 1, "per_device": first[0], "grad_acc": first[1],
                                           "reason": first[2] or "as configured"}]
                             + [{"attempt": r["attempt"] + 1, "per_device": r["batch_size"], "grad_acc": r["grad_acc"],
                                 "reason": f"out of memory at step {r['step']} ({r['error'][:80]})"} for r in retries]
                             + evidence["batch"]["attempts"][1:]}
    return {**evidence, "distributed": {"nproc": n, **outcome["distributed"], "command": cmd[1:]}}


if __name__ == "__main__":   # debugging aid: print the command for a stage
    print(json.dumps(command(2, {"precision": "fp32"}, sys.argv[1] if len(sys.argv) > 1 else "sft", "FP",
                             Path("config.json"), Path("result.json"))))

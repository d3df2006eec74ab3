"""One rank of a distributed stage. Started by pipeline/launch.py's Accelerate runner, not by hand:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... \
        -m pipeline.train_worker sft <fingerprint> <config.json> <result.json>

Every rank rebuilds the stage's context (engine.make_ctx: scoped again) and calls the stage's run(ctx) once;
the training code syncs through accelerate's PartialState; rank 0 alone copies the final checkpoint and writes
<result.json> ({"evidence": ...} or {"skip"|"failed": reason}, with the `distributed` block and what it read).
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    kind, fingerprint, config_file, result_file = argv if argv is not None else sys.argv[1:]
    from accelerate import PartialState
    from rich.console import Console

    from pipeline import engine, launch, ranks, seeds
    from pipeline import evidence as ev
    from pipeline.stages import REGISTRY
    cfg = launch.config_from_dict(json.loads(Path(config_file).read_text()))
    registry = seeds.worker_registry(REGISTRY, cfg, kind)   # a seed replicate ("dpo@seed2") and its upstream
    ctx = engine.make_ctx(registry[kind], cfg, Console(highlight=False), registry, fingerprint)
    # before any Trainer: the process group the TrainingArguments will join (gloo on a CPU, nccl on GPUs)
    state = PartialState(cpu=ctx.plan["device"] == "cpu")
    rank = f"train_worker rank {state.process_index} of {state.num_processes}"
    try:
        outcome = {"evidence": ctx.stage.run(ctx)}
    except ranks.RankDone:
        print(f"{rank}: training done; rank 0 copies the final and writes the evidence", flush=True)
        return 0
    except ranks.RankOOM as exc:   # it cannot retry alone: exit, torchrun stops the others, the parent retries
        ev.atomic_write_json(Path(result_file).with_name("oom.json"), exc.info)
        print(f"{rank}: {exc}; exiting so that the launcher relaunches every rank with half the batch", flush=True)
        return 3
    except engine.SkipStage as exc:
        outcome = {"skip": str(exc)}
    except engine.StageFailed as exc:
        outcome = {"failed": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the stage's failure
        traceback.print_exc()
        outcome = {"failed": f"{type(exc).__name__}: {exc}"}
    if state.is_main_process:
        outcome["distributed"] = {"world_size": state.num_processes, "backend": state.backend,
                                  "distributed_type": str(state.distributed_type)}
        outcome["config_read"] = sorted(ctx.cfg.reads)
        ev.atomic_write_json(result_file, outcome)
        print(f"{rank}: wrote {result_file}", flush=True)
    return 0 if "evidence" in outcome else 1


if __name__ == "__main__":
    sys.exit(main())

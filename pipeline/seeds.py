"""Seed replicates: `SEEDS=1,2,3` (runtime.seeds) re-runs every training method that trains on from another
stage's final (DPO, SimPO, KTO, ORPO: whatever the registry lists), and SFT too under runtime.replicate_sft, once
per extra seed; each replicate is then scored on the main run's question ids.

The engine is handed `expand(registry, cfg)`: each replicate is an ordinary stage of the registry, a copy of the
main stage's declaration named `<stage>@seed<N>` with its own evidence (reports/training/seeds/<N>/...), its own
checkpoint folder (checkpoints/seeds/<N>/<stage>/final) and its own runtime.seed (core.stage_config): the engine's
fingerprint, skip-if-fresh, marker and resume apply to each one unchanged, and the gate checks it with the main
stage's own checks. The main stages, their evidence and their CONTRACT paths do not change: runtime.seeds and
replicate_sft only pick stages (metadata "selects"), so they are in no main stage's fingerprint.

Run: SEEDS=1,2 python -m pipeline run all   (the mean +- sd across seeds: pipeline/stages/seeds.py)
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import PurePosixPath

from pipeline.core import Registry, Replicate, Stage

AGGREGATE = "seeds"   # pipeline/stages/seeds.py: the replicates run just before it and it needs their evals
EVAL = "eval"         # the stage whose scoring each seed repeats (on its own replicates only)


def name(stage: str, seed: int) -> str:
    return f"{stage}@seed{seed}"


def extra_seeds(cfg) -> tuple[list[int], list[str]]:
    """The seeds to replicate, in the given order, and a note for each one dropped: a duplicate, or the main run's
    own seed (runtime.seed: the main run is that replicate)."""
    main, out, notes = cfg.runtime.seed, [], []
    for seed in cfg.runtime.seeds:
        if seed == main:
            notes.append(f"SEEDS: {seed} is the main run's seed (runtime.seed): dropped, the main run is that seed")
        elif seed in out:
            notes.append(f"SEEDS: {seed} is listed twice: replicated once")
        else:
            out.append(seed)
    return out, notes


def replicated(registry: Registry, cfg) -> list[str]:
    """The main training stages each extra seed re-runs: every method that trains on from another stage's final,
    and under runtime.replicate_sft also those that start from the base model (SFT)."""
    return [m for m in registry.methods if registry[m].method.start in registry or cfg.runtime.replicate_sft]


def replicate(stage: Stage, seed: int, which: list[str]) -> Stage:
    """`stage` once more with `seed`: the same declaration, run, checks and schema; its own paths; upstream
    replicates of the same seed where they exist (dpo@seed2 starts from sft@seed2 under replicate_sft)."""
    own = lambda n: name(n, seed) if n in which else n   # noqa: E731
    rep = Replicate(stage.name, seed, own(stage.method.start))
    return dataclasses.replace(
        stage, name=name(stage.name, seed), evidence_path=f"{rep.reports}/{PurePosixPath(stage.evidence_path).name}",
        needs=tuple(own(n) for n in stage.needs), schema=stage.schema or stage.name, replicate=rep,
        method=dataclasses.replace(stage.method, checkpoint=f"checkpoints/seeds/{seed}/{stage.name}"))


def eval_replicate(registry: Registry, seed: int, trained: list[str]) -> Stage:
    """eval@seed<N>: the seed's replicates scored on the main eval's question ids, as the main eval declares."""
    from pipeline.stages import seeds as S
    main = registry[EVAL]
    return Stage(name(EVAL, seed), f"reports/eval/seeds/{seed}/eval.json", reads=main.reads, untracked=main.untracked,
                 needs=tuple(n for n in ("gpu_check", *trained) if n in registry or n in trained),
                 inputs=main.inputs, schema="seed_eval", run=S.run_eval, checks=S.eval_checks,
                 replicate=Replicate(EVAL, seed))


def expand(registry: Registry, cfg, console=None, seeds: list[int] | None = None) -> Registry:
    """The registry with every replicate of every extra seed, placed before the aggregate stage (after the main
    run's stages: the main results come first); the registry itself when there are none."""
    if seeds is None:
        seeds, notes = extra_seeds(cfg)
        for note in notes if console is not None else ():
            console.print(f"[yellow]note:[/] {note}")
    if not seeds or any(s.replicate for s in registry.stages):
        return registry
    which, new = replicated(registry, cfg), []
    for seed in seeds:
        new += [replicate(registry[m], seed, which) for m in which]
        if EVAL in registry:
            new.append(eval_replicate(registry, seed, [name(m, seed) for m in which]))
    stages = list(registry.stages)
    at = next((i for i, s in enumerate(stages) if s.name == AGGREGATE), len(stages))
    if at < len(stages):
        evals = tuple(s.name for s in new if s.kind == EVAL)
        stages[at] = dataclasses.replace(stages[at], needs=stages[at].needs + evals)
    return Registry(stages[:at] + new + stages[at:])


def worker_registry(registry: Registry, cfg, stage_name: str) -> Registry:
    """A training rank's registry (pipeline/train_worker.py): a replicate's name names its seed (the rank's config
    already carries it as runtime.seed, so extra_seeds would drop it)."""
    if stage_name in registry:
        return registry
    seed = stage_name.rpartition("@seed")[2]
    return expand(registry, cfg, seeds=[int(seed)])


def main_of(stage: str) -> str:
    """"dpo@seed2" -> "dpo"."""
    return stage.partition("@")[0]


def mean_sd(per_seed: dict) -> dict:
    """{mean, sd, n_seeds, per_seed} of one figure across seeds ({seed: value}): the sample standard deviation
    (n - 1, statistics.stdev), None with a single seed; per_seed keyed by the seed as a string (JSON)."""
    values = list(per_seed.values())
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n_seeds": len(values), "per_seed": {str(k): v for k, v in per_seed.items()}}

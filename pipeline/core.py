"""What a stage is, what it sees, and the registry that lists them. No project imports: the stages, the engine,
the gate and the tests all build on this module, so nothing here can form an import circle.

A stage receives exactly what it declares (Kedro's rule): `ctx.cfg` lets it read only the config keys in its
`reads` (fingerprinted) and `untracked` (read, but they cannot change the result: log sinks, test hooks),
`ctx.evidence` only the stages upstream of it, and `ctx.cfg.data_path` only the files its `inputs` declare.
The fingerprint is built from the same declaration, so it is complete by construction.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class SkipStage(Exception):
    """Raise with a reason (and a code for the advice table): `skipped` evidence, or `failed` where a skip is not
    allowed (a training stage under ALLOW_SKIP_TRAINING=false)."""

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        self.code = code


class StageFailed(Exception):
    """Raise with a one-line reason for the user: `failed` evidence and a non-zero exit."""

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True)
class Check:
    """One line of the gate: `id` is `<stage>.<what>` or `chain.<what>`; `code` keys the advice table."""
    id: str
    passed: bool
    detail: str
    evidence: str
    code: str | None = None
    blocked_by: str | None = None


@dataclass(frozen=True)
class Method:
    """A training method's place in the family: every part that iterates methods asks the registry for these."""
    checkpoint: str                  # CONTRACT folder of its checkpoints ({slug} is filled in), final under /final
    start: str = "sft"               # "base" (SFT) or "sft": trains on from the SFT final
    sequences_per_example: int = 1   # 2 for paired preference data (chosen + rejected)
    full_logits: bool = False        # the trainer materialises the full-vocabulary logits (CPOTrainer)
    casts_adapters_bf16: bool = True  # under QLoRA the trainer casts the trainable params to bf16
    min_batch: int = 1               # KTO refuses a per-device batch of 1
    trainer: str = ""                # TRL trainer class, for reports
    reference: str = "ref_adapter"   # what the loss compares against (pipeline/reference.py KINDS): TRL's frozen
                                     # copy of the SFT adapter, checked at train begin; "none": reference-free


@dataclass(frozen=True)
class Stage:
    name: str
    evidence_path: str                               # relative to the output root; {slug} is the tier's slug
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()                      # config sections ("sft"), keys ("runtime.seed"), "*", or
                                                     # "@methods.<key>": that key of every training method;
                                                     # "@aligned": the sections of the methods trained from SFT
    untracked: tuple[str, ...] = ()                  # read but not fingerprinted: cannot change the result
    inputs: Callable | None = None                   # cfg -> files whose sha256 enter the fingerprint
    in_all: bool = True                              # part of `run all`
    in_all_when: str | None = None                   # a bool config key that adds it to `run all` (MERGE_FINAL)
    in_dry_run: bool = False                         # runs for real under DRY_RUN=true (it trains nothing)
    training: bool = False                           # a skip is a failure when ALLOW_SKIP_TRAINING=false
    runs_after_skip: bool = False                    # still runs when a need was skipped
    needs_methods: bool = False                      # needs every training method in the registry
    done_status: str = "ok"
    always_run: bool = False                         # never "up to date"
    stops_run: bool = False                          # its failure stops the run before the next stage (preflight)
    requested: Callable | None = None                # cfg -> None, or why it is not asked for (skipped, up to date
                                                     # while the fingerprint stays and it stays unrequested)
    machine: Callable | None = None                  # cfg -> facts about this machine that enter the fingerprint
    content: Callable | None = None                  # cfg -> content identities that enter the fingerprint (the
                                                     # base model's: models.base_content)
    method: Method | None = None
    config: type | None = None                       # a method's config section (settings.SFTCfg, ...)
    distributed: bool = False                        # NPROC>1: the engine's runner launches N ranks of run()
    prepare: Callable | None = None                  # prepare(ctx): once in the parent before the ranks start
    schema: str | None = None                        # schema file name (default: the stage name)
    run: Callable | None = None                      # run(ctx) -> dict of evidence fields
    checks: Callable | None = None                   # checks(gate_ctx, doc) -> list[Check]
    trainer: Callable | None = None                  # trainer(cfg) -> (TRL config class, trainer class, paired,
                                                     #   extra config arguments): a method trained from SFT
    advice: tuple[str, ...] = ()                     # stages whose evidence it may read when fresh (ctx.advice):
                                                     #   how to run (a batch), not what: not in its fingerprint
    guard: Callable | None = None                    # guard(cfg, registry, done, todo) -> None or why the run stops
                                                     #   before todo[0] (the engine asks it once this stage is ok)

    def evidence(self, cfg) -> str:
        return self.evidence_path.format(slug=cfg.slug)

    def checkpoint(self, cfg) -> str | None:
        return self.method.checkpoint.format(slug=cfg.slug) if self.method else None


class Registry:
    """The only list of stages, in run order. Everything that iterates methods or stages asks it."""

    def __init__(self, stages: list[Stage]):
        methods = tuple(s.name for s in stages if s.method)
        groups = {"@methods": methods, "@aligned": tuple(s.name for s in stages if s.method and s.method.start == "sft")}

        def expand(keys):   # "@methods.batch_size" -> "sft.batch_size", ...; "@aligned" -> "dpo", "simpo", ...
            out = []
            for key in keys:
                group, dot, rest = key.partition(".")
                out += [f"{m}{dot}{rest}" for m in groups[group]] if group in groups else [key]
            return tuple(dict.fromkeys(out))
        resolved, names = [], {s.name for s in stages}
        for s in stages:
            s = dataclasses.replace(s, reads=expand(s.reads), untracked=expand(s.untracked),
                                    needs=tuple(dict.fromkeys(s.needs + (methods if s.needs_methods else ()))),
                                    advice=tuple(n for n in s.advice if n in names))   # advice is optional
            resolved.append(s)
        self.stages = tuple(resolved)
        self.by_name = {s.name: s for s in self.stages}
        for s in self.stages:
            unknown = [n for n in s.needs if n not in self.by_name]
            if unknown:
                raise ValueError(f"stage {s.name} needs unknown stage(s) {unknown}")

    @classmethod
    def from_modules(cls, names: list[str], package: str = "pipeline.stages") -> "Registry":
        """Each pipeline/stages/<name>.py exports STAGE (its declaration), run and optionally checks."""
        stages = []
        for name in names:
            mod = importlib.import_module(f"{package}.{name}")
            stages.append(dataclasses.replace(mod.STAGE, run=mod.run, checks=getattr(mod, "checks", None),
                                              trainer=getattr(mod, "trainer", None), guard=getattr(mod, "guard", None)))
        return cls(stages)

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    @property
    def methods(self) -> tuple[str, ...]:
        """Training methods, in run order (sft first)."""
        return tuple(s.name for s in self.stages if s.method)

    @property
    def aligned(self) -> tuple[str, ...]:
        """Methods that train on from the SFT final."""
        return tuple(s.name for s in self.stages if s.method and s.method.start == "sft")

    @property
    def variants(self) -> tuple[str, ...]:
        """What eval and the judges score: the base model and every method's final."""
        return ("base", *self.methods)

    def upstream(self, name: str) -> list[str]:
        """Every stage `name` needs, directly or through its needs."""
        seen: list[str] = []

        def walk(n):
            for need in self.by_name[n].needs:
                if need not in seen:
                    seen.append(need)
                    walk(need)
        walk(name)
        return seen

    def order(self, targets: list[str], dry_run: bool = False, with_needs: bool = True, cfg=None) -> list[Stage]:
        """Targets plus their needs, in registry order. 'all' = every in_all stage (a dry run adds its own), and
        every stage whose in_all_when key is true in `cfg`."""
        if targets == ["all"]:
            targets = [s.name for s in self.stages if s.in_all or (dry_run and s.in_dry_run)
                       or (cfg is not None and s.in_all_when and config_part(cfg, s.in_all_when) is True)]
        wanted: set[str] = set()

        def add(name):
            if name not in self.by_name:
                raise SystemExit(f"unknown stage {name!r}: choose one of {', '.join(self.by_name)} or 'all'")
            if name not in wanted:
                wanted.add(name)
                for n in self.by_name[name].needs if with_needs else ():
                    add(n)
        for t in targets:
            add(t)
        if dry_run and any(not self.by_name[n].in_dry_run for n in wanted):
            for s in self.stages:   # what would really run is replaced by the dry-run report (and its needs)
                if s.in_dry_run and s.done_status == "dry_run":
                    add(s.name)
        return [s for s in self.stages if s.name in wanted]


# --- what a stage may read -----------------------------------------------------------------------
ALWAYS = ("tier", "slug", "root", "cache_dir")   # tier: in every fingerprint; root, cache_dir: where, not what


def declared(allowed: tuple[str, ...], key: str) -> bool:
    section = key.partition(".")[0]
    return "*" in allowed or key in allowed or section in allowed


class ScopedCfg:
    """The resolved config as one stage sees it: reading an undeclared key raises StageFailed naming the key and
    the fix. Every read is recorded (`reads`), so a test can compare the declaration with what was read."""

    def __init__(self, cfg, stage: Stage, inputs: list[Path] | None = None, reads: set | None = None):
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_allowed", stage.reads + stage.untracked)
        object.__setattr__(self, "_inputs", None if inputs is None else [Path(p).resolve() for p in inputs])
        object.__setattr__(self, "reads", set() if reads is None else reads)

    def _deny(self, key: str, what: str = "config key"):
        raise StageFailed(f"stage {self._stage.name} read {what} {key!r} without declaring it: add it to reads= "
                          f"(or untracked= if it cannot change the result) in pipeline/stages/{self._stage.name}.py",
                          code="undeclared_read")

    def _read(self, key: str):
        if not declared(self._allowed, key):
            self._deny(key)
        self.reads.add(key)

    def __getattr__(self, name: str):
        if name in ALWAYS:
            return getattr(self._cfg, name)
        value = getattr(self._cfg, name)
        if dataclasses.is_dataclass(value):
            return ScopedSection(self, name, value)
        if callable(value):
            raise AttributeError(f"ScopedCfg has no {name}(): read the keys the stage declares")
        self._read(name)
        return value

    def __setattr__(self, name, value):
        raise StageFailed(f"stage {self._stage.name} tried to change the config ({name}): stages read it only")

    def section(self, name: str) -> dict:
        if name not in self._allowed and "*" not in self._allowed:
            self._deny(name, "config section")
        self.reads.update(f"{name}.{f.name}" for f in dataclasses.fields(getattr(self._cfg, name)))
        return self._cfg.section(name)

    def to_dict(self) -> dict:
        if "*" not in self._allowed:
            self._deny("*", "the whole config")
        self.reads.add("*")
        return self._cfg.to_dict()

    def data_path(self, rel: str) -> Path:
        """A data file or folder, which must be among (or contain) the stage's declared inputs."""
        p = self._cfg.data_path(rel)
        if self._inputs is not None:
            r = p.resolve()
            if not any(i == r or i.is_relative_to(r) for i in self._inputs):
                self._deny(str(rel), "data file")
        return p

    def unscoped(self):
        """The whole config, for handing to the stage's own worker processes (which see it scoped again)."""
        return self._cfg


class ScopedSection:
    def __init__(self, scoped: ScopedCfg, name: str, value):
        object.__setattr__(self, "_scoped", scoped)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_value", value)

    def __getattr__(self, key: str):
        self._scoped._read(f"{self._name}.{key}")
        return getattr(self._value, key)

    def __setattr__(self, key, value):
        raise StageFailed(f"stage {self._scoped._stage.name} tried to change {self._name}.{key}: stages read the "
                          "config only")


def config_part(cfg, key: str):
    """The value of a declared key in the fingerprint: "*" (all but where, and but the fields that only pick which
    stages `run all` runs: metadata {"selects": True}, e.g. export.merge_final), a section, or one field."""
    if key == "*":
        out = {k: v for k, v in cfg.to_dict().items() if k not in ("root", "cache_dir")}
        for name, part in out.items():
            section = getattr(cfg, name, None)
            for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
                if f.metadata.get("selects"):
                    part.pop(f.name, None)
        return out
    section, _, sub = key.partition(".")
    return getattr(getattr(cfg, section), sub) if sub else cfg.section(section)


@dataclass
class Ctx:
    """What a stage sees: its scoped config, the output root, upstream evidence, the hardware plan, secrets."""
    cfg: ScopedCfg
    stage: Stage
    console: object
    registry: Registry
    fingerprint: str = ""
    read_evidence: Callable = field(default=None, repr=False)   # path -> dict | None
    secrets: Callable = field(default=None, repr=False)          # name -> str | None
    read_advice: Callable = field(default=None, repr=False)      # stage name -> its evidence if fresh, else None

    @property
    def root(self) -> Path:
        return Path(self.cfg.root)

    @property
    def name(self) -> str:
        return self.stage.name

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def evidence(self, stage: str) -> dict | None:
        if stage != self.name and stage not in self.registry.upstream(self.name):
            raise StageFailed(f"stage {self.name} read the evidence of {stage}, which it does not need: add "
                              f"{stage!r} to needs= in pipeline/stages/{self.name}.py", code="undeclared_read")
        return self.read_evidence(self.root / self.registry[stage].evidence(self.cfg))

    def advice(self, stage: str) -> dict | None:
        """The evidence of a stage this one takes advice from (Stage.advice), when it is up to date; else None."""
        if stage not in self.stage.advice:
            raise StageFailed(f"stage {self.name} read the advice of {stage} without declaring it: add {stage!r} to "
                              f"advice= in pipeline/stages/{self.name}.py", code="undeclared_read")
        return self.read_advice(stage) if self.read_advice else None

    @property
    def plan(self) -> dict:
        """The plan this process executes: gpu_check's plan, or in a rehearsal its CPU run_plan."""
        check = self.evidence("gpu_check")
        if not check or "plan" not in check:
            raise StageFailed("no hardware plan: run `make gpu-check` (python -m pipeline run gpu_check) first")
        return check.get("run_plan") or check["plan"]

    def secret(self, name: str) -> str | None:
        return self.secrets(name)

    def log(self, msg: str) -> None:
        self.console.print(f"[dim]{self.name}:[/] {msg}")

    def progress(self, iterable, total=None, description=""):
        from rich.progress import track
        return track(iterable, total=total, description=description or self.name, console=self.console,
                     transient=False)

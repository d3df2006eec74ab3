"""The typed config: one dataclass per section, each validating its own ranges, and `Config` holding them.

The methods' sections come from the registry (each training stage declares its class as `Stage.config`).
pipeline.settings resolves the values (files, environment, arguments) into these classes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"
TIERS = ("tiny", "demo", "7b", "14b")
GPU_TIERS = ("7b", "14b")
SECRET_VARS = ("OPENAI_API_KEY",)
SLUGS = {"tiny": "tiny", "demo": "smollm2_135m", "7b": "qwen25_7b", "14b": "qwen25_14b"}
HUB_MODELS = {"7b": "Qwen/Qwen2.5-7B-Instruct", "14b": "Qwen/Qwen2.5-14B-Instruct"}


class ConfigError(ValueError):
    """A config value or key is wrong; the message says where it came from and what to do."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _numbers(obj) -> None:
    """Every int/float field of a section is a finite number >= 0 (or None where the field allows it): no knob of
    ours means anything below zero, and NaN/inf would pass every comparison a stage makes."""
    import math
    import typing
    for name, typ in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name, None)
        kinds = set(typing.get_args(typ)) or {typ}
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not kinds & {int, float}:
            continue
        _check(math.isfinite(value) and value >= 0, f"{name} must be a finite number >= 0, got {value}")


@dataclass
class ModelCfg:
    name: str | None = None          # MODEL_NAME: a local folder (or a hub name on a machine that can reach one)
    qlora: bool = False              # 4-bit QLoRA where the hardware plan allows it
    flash_attn: bool = True          # use flash_attention_2 when installed, Ampere+, not 4-bit
    tiny_seed: int = 0               # seed of the locally built tiny model

    def __post_init__(self):
        _numbers(self)


@dataclass
class LoraCfg:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
        _numbers(self)
        _check(self.r > 0, f"lora.r must be > 0, got {self.r}")
        _check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "lora.target_modules is empty: name at least one module")


OPTIMIZERS = ("adamw_torch", "paged_adamw_8bit", "adamw_8bit", "sgd")


@dataclass
class TrainCfg:
    """What every training method has. max_steps is the plan; curriculum is cumulative. Each method's section is
    a subclass with only the knobs that method reads (SFTCfg, PreferenceCfg, SimPOCfg): no dead keys."""
    max_steps: int = 100
    learning_rate: float = 2e-4
    batch_size: int = 1
    grad_acc: int = 8
    max_length: int = 2048
    warmup_ratio: float = 0.03
    logging_steps: int = 1
    save_steps: int = 25
    save_total_limit: int = 2
    optimizer: str = "adamw_torch"
    activation_checkpointing: bool = True
    max_oom_retries: int = 3
    curriculum: list[dict] = field(default_factory=list)
    trl: dict = field(default_factory=dict)   # passed verbatim to the TRL config class, which validates them   # [{"max_length": 512, "until_step": 40}, ...]

    def __post_init__(self):
        _numbers(self)
        _check(self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        _check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_acc >= 1, f"grad_acc must be >= 1, got {self.grad_acc}")
        _check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        _check(self.save_steps >= 1 and self.logging_steps >= 1, "save_steps and logging_steps must be >= 1")
        _check(self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        last = 0
        for i, sub in enumerate(self.curriculum):
            _check(isinstance(sub, dict) and set(sub) == {"max_length", "until_step"},
                   f"curriculum[{i}] must have exactly the keys max_length and until_step, got {sub!r}")
            _check(isinstance(sub["until_step"], int) and sub["until_step"] > last,
                   f"curriculum[{i}].until_step must be an integer > {last} (cumulative steps), got {sub['until_step']!r}")
            _check(isinstance(sub["max_length"], int) and sub["max_length"] >= 16,
                   f"curriculum[{i}].max_length must be an integer >= 16")
            last = sub["until_step"]
        if self.curriculum:
            _check(last == self.max_steps,
                   f"curriculum ends at step {last} but max_steps is {self.max_steps}: make the last until_step equal max_steps")


@dataclass
class SFTCfg(TrainCfg):
    eval_steps: int = 25             # held-out eval_loss every this many steps
    packing: bool = False

    def __post_init__(self):
        super().__post_init__()
        _check(self.eval_steps >= 1, f"eval_steps must be >= 1, got {self.eval_steps}")


@dataclass
class PreferenceCfg(TrainCfg):
    beta: float = 0.1                # DPO/KTO beta (ORPO: its lambda)

    def __post_init__(self):
        super().__post_init__()
        _check(self.beta > 0, f"beta must be > 0, got {self.beta}")


@dataclass
class SimPOCfg(PreferenceCfg):
    simpo_gamma: float = 0.5         # SimPO target reward margin (gamma_beta_ratio = gamma / beta)


@dataclass
class DataCfg:
    sft_path: str = "data/medicalgpt_medical_sft_zh_1k/medical_sft_1K_format.jsonl"
    sft_format: str = "auto"
    preference_path: str = "data/medicalgpt_medical_reward_zh_100/test.json"
    preference_format: str = "auto"
    kto_path: str | None = None      # None: KTO rows come from unpairing the preference pairs
    medqa_path: str = "data/medqa_usmle_4opt_test/test.jsonl"
    pubmedqa_path: str = "data/pubmedqa_pqal/ori_pqal.json"
    pubmedqa_test_ids: str = "data/pubmedqa_pqal/test_ground_truth.json"
    cmmlu_dir: str = "data/cmmlu_medical_zh"
    on_bad_row: str = "error"
    sft_eval_size: int = 50          # held out from SFT training for the eval_loss curve
    judge_heldout_size: int = 30     # held out from SFT training for the LLM judge
    max_sft_rows: int | None = None  # cap on training rows (None: all)
    max_preference_rows: int | None = None  # cap on preference pairs (None: all)
    seed: int = 42

    def __post_init__(self):
        _numbers(self)
        _check(self.on_bad_row in ("error", "skip"), f"on_bad_row must be 'error' or 'skip', got {self.on_bad_row!r}")
        _check(self.sft_eval_size >= 1 and self.judge_heldout_size >= 0, "sft_eval_size must be >= 1, judge_heldout_size >= 0")


def _eval_sets() -> tuple[str, ...]:
    """The eval sets pipeline/evalsets/ lists (a light import: no torch)."""
    from pipeline import evalsets
    return evalsets.names()


def _all_sets() -> list[str]:
    return list(_eval_sets())


def _full_sizes() -> dict:
    return dict.fromkeys(_eval_sets())


@dataclass
class EvalCfg:
    sets: list[str] = field(default_factory=_all_sets)   # names: pipeline/evalsets/__init__.py NAMES
    sample_sizes: dict = field(default_factory=_full_sizes)   # None: the full set
    seed: int = 1234
    batch_size: int = 8
    max_new_tokens: int = 32
    llm_fallback: bool = True        # ENABLE_V2_LLM_FALLBACK
    n_bootstrap: int = 2000
    degenerate_share: float = 0.6    # one answer above this share of a set, the gold's largest below: degenerate
    format_failure_margin: float = 0.10   # a trained variant's format-failure rate above the base's by more: blocker
    free_answer: bool = False        # protocol free_answer_extraction for the base too (results_free); on: 7b, 14b
    free_answer_sets: list[str] = field(default_factory=lambda: ["medqa", "pubmedqa"])   # those with figures
    free_answer_max_new_tokens: int = 1024

    def __post_init__(self):
        _numbers(self)
        known = _eval_sets()
        bad = [s for s in self.sets if s not in known]
        _check(not bad, f"eval.sets has unknown set(s) {bad}: use {', '.join(known)}")
        bad = [s for s in self.sample_sizes if s not in known]
        _check(not bad, f"eval.sample_sizes has unknown set(s) {bad}: use {', '.join(known)}")
        _check(self.batch_size >= 1 and self.max_new_tokens >= 1, "eval.batch_size and eval.max_new_tokens must be >= 1")
        bad = {s: n for s, n in self.sample_sizes.items() if n is not None and (type(n) is not int or n < 1)}
        _check(not bad, f"eval.sample_sizes {bad}: use a count >= 1, or null for the full set (leave a set out "
                        "with eval.sets)")
        _check(0 < self.degenerate_share < 1,
               f"eval.degenerate_share must be in (0, 1) (a share of a set's questions), got {self.degenerate_share}")
        bad = [s for s in self.free_answer_sets if s not in known]
        _check(not bad, f"eval.free_answer_sets has unknown set(s) {bad}: use {', '.join(known)}")
        _check(self.free_answer_max_new_tokens >= 1, "eval.free_answer_max_new_tokens must be >= 1")
        _check(0 <= self.format_failure_margin < 1, "eval.format_failure_margin must be in [0, 1) (a share of a set's "
               f"questions: 0.10 = 10 points), got {self.format_failure_margin}")


@dataclass
class JudgeCfg:
    enabled: bool = False            # ENABLE_LLM_JUDGE (pairwise)
    risk_enabled: bool = True        # ENABLE_LLM_RISK_JUDGE
    base_url: str | None = None      # OPENAI_BASE_URL
    model: str = "gpt-4o-mini"       # JUDGE_MODEL
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3
    max_reasks: int = 1
    max_new_tokens: int = 256        # answer length of the judged variants
    min_coverage: float = 0.9
    prices: dict = field(default_factory=dict)   # {model: {"input_per_1m": usd, "output_per_1m": usd}}

    def __post_init__(self):
        _numbers(self)
        _check(0 < self.min_coverage <= 1, f"judge.min_coverage must be in (0, 1], got {self.min_coverage}")
        _check(self.concurrency >= 1, "judge.concurrency must be >= 1")


REPORTERS = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "trackio", "swanlab", "dvclive",
             "neptune", "codecarbon", "azure_ml", "dagshub", "flyte")   # transformers' report_to integrations


@dataclass
class RuntimeCfg:
    allow_skip_training: bool = True
    force_skip_training: bool = False
    min_cuda_mem_gb_7b: float = 18.0
    min_cuda_mem_gb_14b: float = 36.0
    nproc: int = 1
    dry_run: bool = False
    hf_home: str | None = None
    seed: int = 42
    inject_oom_at_step: int | None = None   # test hook: raise torch.OutOfMemoryError at this global step
    inject_oom_rank: int | None = None      # test hook: only this rank raises it (None: every rank)
    deepspeed_config: str | None = None     # e.g. configs/deepspeed/zero3.json (needs `pip install deepspeed`)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])   # add "wandb" when configured
    gpu_probe_file: str | None = None       # GPU_PROBE_FILE: a recorded probe (configs/probes/*.json) replaces the live one
    rehearsal: bool = False                 # REHEARSAL: a GPU tier's exact configuration on the CPU, stand-in model
    rehearsal_steps: int = 12               # REHEARSAL_STEPS: optimizer steps of the longest training stage
    rehearsal_eval_samples: int = 4         # eval questions per set in a rehearsal
    rehearsal_changes: list[str] = field(default_factory=list)   # filled by the rehearsal: what it changed, why
    rehearsal_fraction: float = 1.0         # filled by the rehearsal: its SFT steps / the tier's (data scale too)

    def __post_init__(self):
        _numbers(self)
        _check(self.nproc >= 1, f"nproc must be >= 1, got {self.nproc}")
        _check(self.rehearsal_steps >= 2, f"rehearsal_steps must be >= 2, got {self.rehearsal_steps}")
        bad = [r for r in self.report_to if r not in REPORTERS]
        _check(not bad, f"report_to has {bad}: use {', '.join(REPORTERS)} (transformers' integrations)")
        if self.deepspeed_config:
            ds = Path(self.deepspeed_config)
            _check((ds if ds.is_absolute() else REPO / ds).is_file(),
                   f"deepspeed_config {self.deepspeed_config} does not exist (relative paths start at {REPO}): "
                   "use configs/deepspeed/zero2.json or unset DEEPSPEED_CONFIG")


@dataclass
class PreflightCfg:
    """pipeline/stages/preflight.py: measured steps per training stage, and the money they may cost."""
    steps: int = 3                         # timed optimizer steps per stage (plus one warm-up, not timed)
    enabled: bool | None = None            # None (auto): on the GPU tiers, or when BUDGET/GPU_PRICE_PER_HOUR is set
    budget: float | None = None            # BUDGET: the most the run may cost (needs price_per_hour)
    price_per_hour: float | None = None    # GPU_PRICE_PER_HOUR, in the budget's currency

    def __post_init__(self):
        _numbers(self)   # a negative or NaN budget/price is an error here
        _check(self.steps >= 1, f"preflight.steps must be >= 1, got {self.steps}")
        _check(self.budget is None or self.price_per_hour is not None,
               "budget (BUDGET) needs price_per_hour (GPU_PRICE_PER_HOUR) in the same currency: set it, or unset "
               "BUDGET")


@dataclass
class ExportCfg:
    merge_final: bool = field(default=False, metadata={"selects": True})   # MERGE_FINAL: `make gpu-run` also
    # merges (stage export_merged, as `make export-merged` does); it picks a stage, so it is in no fingerprint
    parity_threshold: float = 0.97   # least agreement of a merged folder with its adapter (answers, first tokens)
    parity_per_set: int = 32         # seeded eval questions per set for the parity check (fewer when eval has fewer)

    def __post_init__(self):
        _numbers(self)
        _check(0 < self.parity_threshold <= 1, f"export.parity_threshold must be in (0, 1], got {self.parity_threshold}")
        _check(self.parity_per_set >= 1, f"export.parity_per_set must be >= 1, got {self.parity_per_set}")


@dataclass
class ReadinessCfg:
    """pipeline/readiness.py (the gate): what a thesis run must show before it is ready for writing."""
    anchor_tolerance_points: float = 5.0   # base vs a published figure (same model, protocol): 95% CI widened by this

    def __post_init__(self):
        _numbers(self)


BASE_SECTIONS = {"model": ModelCfg, "lora": LoraCfg, "data": DataCfg, "eval": EvalCfg, "judge": JudgeCfg,
                 "runtime": RuntimeCfg, "preflight": PreflightCfg, "export": ExportCfg, "readiness": ReadinessCfg}


def method_sections() -> dict[str, type]:
    """Each training method's config section, as its stage declares it (core.Stage.config): the registry is the
    only list of methods, so a new method needs no edit here."""
    from pipeline.stages import REGISTRY   # at call time: the stage modules import this module
    return {s.name: s.config for s in REGISTRY.stages if s.method}


def sections() -> dict[str, type]:
    return {**BASE_SECTIONS, **method_sections()}


@dataclass
class Config:
    tier: str = "7b"
    root: str = str(REPO)
    cache_dir: str = ""
    model: ModelCfg = field(default_factory=ModelCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    data: DataCfg = field(default_factory=DataCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    runtime: RuntimeCfg = field(default_factory=RuntimeCfg)
    preflight: PreflightCfg = field(default_factory=PreflightCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    readiness: ReadinessCfg = field(default_factory=ReadinessCfg)
    methods: dict = field(default_factory=lambda: {k: cls() for k, cls in method_sections().items()})

    def __post_init__(self):
        _numbers(self)
        _check(self.tier in TIERS, f"tier {self.tier!r} is not one of {', '.join(TIERS)}")

    def __getattr__(self, name: str):   # cfg.sft, cfg.dpo, ...: the methods' sections
        methods = self.__dict__.get("methods") or {}
        if name in methods:
            return methods[name]
        raise AttributeError(f"config has no section or key {name!r}")

    @property
    def slug(self) -> str:
        return SLUGS[self.tier]

    def to_dict(self) -> dict:
        """Every section at the top level (the methods' beside the others), as `python -m pipeline config` shows."""
        out = dataclasses.asdict(self)
        return {**{k: v for k, v in out.items() if k != "methods"}, **out["methods"]}

    def section(self, name: str) -> dict:
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    def data_path(self, rel: str) -> Path:
        """Data paths are relative to the repository (bundled data) unless absolute."""
        p = Path(rel)
        return p if p.is_absolute() else REPO / p

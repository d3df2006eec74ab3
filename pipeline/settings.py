"""Typed configuration. The ONLY module that reads os.environ and .env.

Precedence: dataclass defaults < configs/base.yaml < configs/<section>.yaml < configs/tiers/<tier>.yaml
< environment variables (CONTRACT list; .env via python-dotenv, the process env wins) < key=value arguments.
Unknown keys and values that do not parse are errors that name where the value came from.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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


@dataclass
class ModelCfg:
    name: str | None = None          # MODEL_NAME: a local folder (or a hub name on a machine that can reach one)
    qlora: bool = False              # 4-bit QLoRA where the hardware plan allows it
    flash_attn: bool = True          # use flash_attention_2 when installed, Ampere+, not 4-bit
    tiny_seed: int = 0               # seed of the locally built tiny model


@dataclass
class LoraCfg:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def __post_init__(self):
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

    def __post_init__(self):
        known = _eval_sets()
        bad = [s for s in self.sets if s not in known]
        _check(not bad, f"eval.sets has unknown set(s) {bad}: use {', '.join(known)}")
        bad = [s for s in self.sample_sizes if s not in known]
        _check(not bad, f"eval.sample_sizes has unknown set(s) {bad}: use {', '.join(known)}")
        _check(self.batch_size >= 1 and self.max_new_tokens >= 1, "eval.batch_size and eval.max_new_tokens must be >= 1")


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
        _check(0 < self.min_coverage <= 1, f"judge.min_coverage must be in (0, 1], got {self.min_coverage}")
        _check(self.concurrency >= 1, "judge.concurrency must be >= 1")


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
        _check(self.nproc >= 1, f"nproc must be >= 1, got {self.nproc}")
        _check(self.rehearsal_steps >= 2, f"rehearsal_steps must be >= 2, got {self.rehearsal_steps}")


BASE_SECTIONS = {"model": ModelCfg, "lora": LoraCfg, "data": DataCfg, "eval": EvalCfg, "judge": JudgeCfg,
                 "runtime": RuntimeCfg}


def method_sections() -> dict[str, type]:
    """Each training method's config section, as its stage declares it (core.Stage.config): the registry is the
    only list of methods, so a new method needs no edit here."""
    from pipeline.stages import REGISTRY   # at call time: the stage modules import this module
    return {s.name: s.config for s in REGISTRY.stages if s.method}


def sections() -> dict[str, type]:
    return {**BASE_SECTIONS, **method_sections()}


def __getattr__(name: str):   # SECTIONS and TRAIN_STAGES are computed from the registry when first asked for
    if name == "SECTIONS":
        return sections()
    if name == "TRAIN_STAGES":
        return tuple(method_sections())
    raise AttributeError(name)


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
    methods: dict = field(default_factory=lambda: {k: cls() for k, cls in method_sections().items()})

    def __post_init__(self):
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


# --- environment -------------------------------------------------------------------------------
ENV_MAP: dict[str, tuple[str, ...]] = {
    "MODEL_TIER": ("tier",), "PIPELINE_ROOT": ("root",), "MODEL_NAME": ("model.name",),
    "ALLOW_SKIP_TRAINING": ("runtime.allow_skip_training",), "FORCE_SKIP_TRAINING": ("runtime.force_skip_training",),
    "ENABLE_LLM_JUDGE": ("judge.enabled",), "ENABLE_LLM_RISK_JUDGE": ("judge.risk_enabled",),
    "ENABLE_V2_LLM_FALLBACK": ("eval.llm_fallback",), "OPENAI_BASE_URL": ("judge.base_url",),
    "JUDGE_MODEL": ("judge.model",), "MIN_CUDA_MEM_GB_7B": ("runtime.min_cuda_mem_gb_7b",),
    "MIN_CUDA_MEM_GB_14B": ("runtime.min_cuda_mem_gb_14b",),
    "BATCH_SIZE": ("@methods.batch_size",), "GRAD_ACC": ("@methods.grad_acc",),   # every training method
    "NPROC": ("runtime.nproc",), "DAY1_DRY_RUN": ("runtime.dry_run",), "DRY_RUN": ("runtime.dry_run",),
    "HF_HOME": ("runtime.hf_home",), "SEED": ("runtime.seed", "data.seed", "eval.seed"),
    "MEDLLM_CACHE": ("cache_dir",), "MEDLLM_INJECT_OOM_AT_STEP": ("runtime.inject_oom_at_step",),
    "MEDLLM_INJECT_OOM_RANK": ("runtime.inject_oom_rank",),
    "DEEPSPEED_CONFIG": ("runtime.deepspeed_config",), "REPORT_TO": ("runtime.report_to",),
    "GPU_PROBE_FILE": ("runtime.gpu_probe_file",), "REHEARSAL": ("runtime.rehearsal",),
    "REHEARSAL_STEPS": ("runtime.rehearsal_steps",), "QLORA": ("model.qlora",),
}


def environment(dotenv_path: Path | None = None) -> dict[str, str]:
    """The process env over .env (python-dotenv); the process env wins."""
    from dotenv import dotenv_values
    path = dotenv_path or REPO / ".env"
    merged = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.is_file() else {}
    merged.update(os.environ)
    return merged


def secret(name: str, env: dict | None = None) -> str | None:
    value = (env if env is not None else environment()).get(name)
    return value or None


def pin_visible_devices(cfg: "Config") -> str | None:
    """NPROC=1 on a machine with several GPUs: the Trainer would wrap the model in nn.DataParallel over all of them
    (transformers counts the visible GPUs as n_gpu). Pin GPU 0 before CUDA starts unless the user chose devices."""
    if cfg.runtime.nproc == 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def env_flag(name: str, default: bool = False) -> bool:
    """For scripts that need one boolean from the environment (parsed like every other flag)."""
    raw = environment().get(name)
    return default if raw in (None, "") else _coerce(raw, bool, f"environment variable {name}")


# --- loading -----------------------------------------------------------------------------------
def _yaml_with_lines(path: Path) -> tuple[dict, dict]:
    """Load a YAML mapping and the line of each dotted key (for error messages)."""
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}): fix the syntax") from None
    if node is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the file must be a YAML mapping of keys to values")
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                if key in lines:
                    raise ConfigError(f"{path}:{k.start_mark.line + 1}: key '{key}' appears twice (first on line "
                                      f"{lines[key]}): keep one")
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")
    walk(node, "")
    return data, lines


def _flatten(d: dict) -> dict:
    """{"sft": {"max_steps": 5}, "tier": "tiny"} -> {"sft.max_steps": 5, "tier": "tiny"}. A `methods:` block
    sets a default for every training method that has the key, before the file's own method sections."""
    shared, out = {}, {}
    for k, v in d.items():
        if k == "methods" and isinstance(v, dict):
            for kk, vv in v.items():
                owners = [m for m, cls in method_sections().items() if kk in {f.name for f in dataclasses.fields(cls)}]
                shared.update({f"{m}.{kk}": (vv, f"methods.{kk}") for m in owners} or {f"methods.{kk}": (vv, None)})
        elif k in sections() and isinstance(v, dict):
            out.update({f"{k}.{kk}": (vv, None) for kk, vv in v.items()})
        else:
            out[str(k)] = (v, None)
    return {**shared, **out}


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _known_keys() -> dict[str, type]:
    known = {k: t for k, t in _field_types(Config).items() if k not in BASE_SECTIONS and k != "methods"}
    for sec, cls in sections().items():
        for k, t in _field_types(cls).items():
            known[f"{sec}.{k}"] = t
    return known


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(value, typ, where: str):
    """Coerce a YAML/env/argument value to the field's type or raise a ConfigError naming `where`."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, where)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(f"accepted values: {', '.join(_TRUE + _FALSE)}")
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if typ is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
        if origin is list or typ is list:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list")
            return value
        if origin is dict or typ is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError("expected a mapping")
            return value
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: cannot parse {value!r} as {getattr(typ, '__name__', typ)} ({exc})") from None
    return value


def load_config(tier: str | None = None, overrides: list[str] | None = None,
                env: dict[str, str] | None = None) -> Config:
    """Resolve the config. `overrides` are key=value arguments (dotted keys, e.g. sft.max_steps=5)."""
    env = environment() if env is None else env
    known = _known_keys()
    values: dict[str, object] = {}
    origin: dict[str, str] = {}

    def put(key, raw, where):
        if key not in known:
            hint = ", ".join(sorted(k for k in known if k.split(".")[0] == key.split(".")[0])[:12])
            raise ConfigError(f"{where}: unknown key '{key}'" + (f" (known keys here: {hint})" if hint else "")
                              + ": remove it or fix its spelling")
        values[key] = _coerce(raw, known[key], where)
        origin[key] = where

    def put_file(path: Path, section: str | None = None):
        if not path.is_file():
            return
        data, lines = _yaml_with_lines(path)
        if section:
            data, lines = {section: data}, {f"{section}.{k}": v for k, v in lines.items()}
        for key, (raw, written) in _flatten(data).items():
            put(key, raw, f"{path}:{lines.get(written or key, 1)}: key '{written or key}'")

    # 1. the tier decides which tier file applies; it comes from args > env > YAML base > default
    arg_pairs = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"argument {item!r}: expected key=value (e.g. sft.max_steps=5)")
        k, v = item.split("=", 1)
        arg_pairs.append((k.strip(), v))
    put_file(CONFIG_DIR / "base.yaml")
    for sec in sections():
        put_file(CONFIG_DIR / f"{sec}.yaml", section=sec)
    arg_tier = next((v for k, v in arg_pairs if k == "tier"), None)
    chosen, where = next((v, w) for v, w in ((tier, "load_config(tier=...)"), (arg_tier, f"argument tier={arg_tier}"),
                                             (env.get("MODEL_TIER"), "environment variable MODEL_TIER"),
                                             (values.get("tier"), origin.get("tier")), (Config.tier, "default")) if v)
    if chosen not in TIERS:
        raise ConfigError(f"{where}: tier {chosen!r} is not one of {', '.join(TIERS)}")
    put_file(CONFIG_DIR / "tiers" / f"{chosen}.yaml")
    for var, keys in ENV_MAP.items():
        raw = env.get(var)
        if raw is None or raw == "":
            continue
        for key in keys:
            for k in ([f"{m}.{key.partition('.')[2]}" for m in method_sections()] if key.startswith("@methods.")
                      else [key]):
                put(k, raw, f"environment variable {var}")
    for k, v in arg_pairs:
        put(k, v, f"argument {k}={v}")
    values["tier"] = chosen
    if values.get("runtime.rehearsal") and "root" not in origin and values.get("runtime.gpu_probe_file"):
        # a rehearsal never writes over a real run's evidence: its own output root unless PIPELINE_ROOT says
        values["root"] = str(REPO / "rehearsals" / f"{Path(str(values['runtime.gpu_probe_file'])).stem}_{chosen}")
    cfg = _build(values, origin)
    if cfg.runtime.rehearsal:
        _rehearse(cfg, origin)
    # Smoke tiers (tiny, demo) and rehearsals judge only when an API key is configured, unless a judge flag was set
    # explicitly; decided here from the same env every time, so the gate in a fresh shell agrees with the run.
    if (chosen in ("tiny", "demo") or cfg.runtime.rehearsal) and not secret("OPENAI_API_KEY", env):
        for key, attr in (("judge.enabled", "enabled"), ("judge.risk_enabled", "risk_enabled")):
            if not origin.get(key, "").startswith(("environment", "argument")):
                setattr(cfg.judge, attr, False)
    return cfg


def config_from_dict(d: dict) -> Config:
    """The inverse of Config.to_dict() (the training workers get the parent's resolved config this way)."""
    methods = method_sections()
    top = {k: BASE_SECTIONS[k](**v) if k in BASE_SECTIONS else v for k, v in d.items() if k not in methods}
    return Config(**top, methods={k: cls(**d[k]) if k in d else cls() for k, cls in methods.items()})


def scaled_steps(tc: TrainCfg, steps: int) -> dict:
    """A training section's step counts scaled to `steps` (never more than it had), keeping every curriculum
    boundary (each sub-stage keeps >= 1 step) and a save/eval point inside every sub-stage."""
    subs = tc.curriculum or [{"max_length": tc.max_length, "until_step": tc.max_steps}]
    total = max(min(steps, tc.max_steps), len(subs))
    bounds, last = [], 0
    for i, sub in enumerate(subs):
        left = len(subs) - i - 1
        b = max(last + 1, min(total - left, round(sub["until_step"] * total / tc.max_steps)))
        bounds.append(b)
        last = b
    first = bounds[0]
    every = max(1, min(first, round(tc.save_steps * total / tc.max_steps)))
    return {"max_steps": total, "save_steps": every, **({"eval_steps": every} if hasattr(tc, "eval_steps") else {}),
            "curriculum": [{"max_length": s["max_length"], "until_step": b} for s, b in zip(subs, bounds)]
            if tc.curriculum else []}


def _rehearse(cfg: Config, origin: dict) -> None:
    """REHEARSAL=true: the GPU tier's configuration as it is, with only step counts and eval samples scaled down."""
    where = origin.get("runtime.rehearsal", "REHEARSAL")
    _check(cfg.tier in GPU_TIERS, f"{where}: REHEARSAL=true rehearses a GPU tier, but MODEL_TIER={cfg.tier}: "
                                  f"set MODEL_TIER=7b or 14b")
    _check(bool(cfg.runtime.gpu_probe_file), f"{where}: REHEARSAL=true needs GPU_PROBE_FILE=<probe.json> "
                                             "(configs/probes/*.json): the plan is made from the GPU it rehearses")
    _check(not cfg.model.name, f"{where}: REHEARSAL=true trains a stand-in model; unset MODEL_NAME={cfg.model.name}")
    sft_steps = cfg.sft.max_steps
    tiny, _ = _yaml_with_lines(CONFIG_DIR / "tiers" / "tiny.yaml")
    changes = []
    for stage in method_sections():
        tc = getattr(cfg, stage)
        share = tc.max_steps / sft_steps   # the stages keep their proportions; sft gets rehearsal_steps
        before = (tc.max_steps, tc.learning_rate)
        for k, v in scaled_steps(tc, max(2, round(cfg.runtime.rehearsal_steps * min(1.0, share)))).items():
            setattr(tc, k, v)
        # the tier's rates are tuned for a pretrained 7B/14B; on the random-init stand-in they would not move the
        # loss in a few steps, so the gate's "loss went down" would be noise: the stand-in trains at its own rates
        tc.learning_rate = float(tiny.get(stage, {}).get("learning_rate",
                                                         tiny.get("methods", {}).get("learning_rate", tc.learning_rate)))
        changes.append(f"{stage}: {before[0]} -> {tc.max_steps} steps (curriculum boundaries "
                       f"{[c['until_step'] for c in tc.curriculum] or 'none'}, save every {tc.save_steps}); "
                       f"learning rate {before[1]:g} -> {tc.learning_rate:g} (the stand-in's, configs/tiers/tiny.yaml)")
    cfg.sft.eval_steps = max(cfg.sft.save_steps, cfg.sft.max_steps // 2)   # held-out eval_loss twice, not every save
    cfg.runtime.rehearsal_fraction = cfg.sft.max_steps / sft_steps
    changes.append(f"training rows scaled like the steps (x{cfg.runtime.rehearsal_fraction:.3g}): each row is seen "
                   "about as often as in the tier's run")
    n = cfg.runtime.rehearsal_eval_samples
    cfg.eval.sample_sizes = {s: min(k or n, n) for s, k in {**{s: None for s in cfg.eval.sets},
                                                           **cfg.eval.sample_sizes}.items()}
    cfg.data.sft_eval_size, cfg.data.judge_heldout_size = min(cfg.data.sft_eval_size, n), min(cfg.data.judge_heldout_size, n)
    changes.append(f"eval: at most {n} questions per set, {n} held-out SFT rows for eval_loss (twice per stage), "
                   f"{cfg.data.judge_heldout_size} judge questions")
    cfg.runtime.rehearsal_changes = changes


def _build(values: dict, origin: dict) -> Config:
    kwargs: dict = {}
    for sec, cls in sections().items():
        sub = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(sec + ".")}
        try:
            kwargs[sec] = cls(**sub)
        except ConfigError as exc:
            where = next((origin[f"{sec}.{k}"] for k in sub
                          if f"{sec}.{k}" in origin and re.search(rf"\b{k}\b", str(exc))), None)
            msg = str(exc) if str(exc).startswith(sec + ".") else f"{sec}.{exc}"
            raise ConfigError(f"{where or 'config section ' + sec}: {msg}") from None
    top = {k: v for k, v in values.items() if "." not in k}
    methods = {k: kwargs.pop(k) for k in method_sections()}
    cfg = Config(**top, **kwargs, methods=methods)
    cfg.root = str(Path(cfg.root).expanduser().resolve())
    if not cfg.cache_dir:
        cfg.cache_dir = str(Path(cfg.root) / ".cache")
    return cfg

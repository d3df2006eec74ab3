"""Resolving the configuration. The ONLY module that reads os.environ and .env; the typed sections it fills are
in pipeline/sections.py (re-exported here).

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
from pathlib import Path

import yaml

from pipeline.sections import (   # one config module for its users: re-exported (__all__)
    REPO, CONFIG_DIR, TIERS, GPU_TIERS, SECRET_VARS, SLUGS, HUB_MODELS, ConfigError, _check, ModelCfg,
    LoraCfg, OPTIMIZERS, TrainCfg, SFTCfg, PreferenceCfg, SimPOCfg, DataCfg, EvalCfg, JudgeCfg, RuntimeCfg,
    BASE_SECTIONS, method_sections, sections, Config)
from pipeline.rehearsal import rehearse, scaled_steps   # REHEARSAL=true (scaled_steps re-exported)

__all__ = ["REPO", "CONFIG_DIR", "TIERS", "GPU_TIERS", "SECRET_VARS", "SLUGS", "HUB_MODELS", "ConfigError", "ModelCfg",
           "LoraCfg", "OPTIMIZERS", "TrainCfg", "SFTCfg", "PreferenceCfg", "SimPOCfg", "DataCfg", "EvalCfg", "JudgeCfg",
           "RuntimeCfg", "BASE_SECTIONS", "method_sections", "sections", "Config", "ENV_MAP", "load_config",
           "config_from_dict", "scaled_steps", "environment", "secret", "pin_visible_devices", "env_flag"]


def __getattr__(name: str):   # SECTIONS and TRAIN_STAGES are computed from the registry when first asked for
    if name == "SECTIONS":
        return sections()
    if name == "TRAIN_STAGES":
        return tuple(method_sections())
    raise AttributeError(name)


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
    "BUDGET": ("preflight.budget",), "GPU_PRICE_PER_HOUR": ("preflight.price_per_hour",),
    "MERGE_FINAL": ("export.merge_final",), "SEEDS": ("runtime.seeds",),
    "HF_ENDPOINT": ("runtime.hf_endpoint",), "MODEL_HUB": ("model.hub",), "HF_HUB_OFFLINE": ("runtime.hf_hub_offline",),
}


DOTENV = REPO / ".env"   # the one .env the settings read (beside .env.example); not the output root's


def environment(dotenv_path: Path | None = None) -> dict[str, str]:
    """The process env over .env (python-dotenv); the process env wins."""
    from dotenv import dotenv_values
    path = dotenv_path or DOTENV
    if path.is_file():
        import io
        merged = {k: v for k, v in dotenv_values(stream=io.StringIO(_utf8(path))).items() if v is not None}
    else:
        merged = {}
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
def _utf8(path: Path) -> str:
    """The text of a config or .env file; one saved in another encoding (GBK from a Chinese Windows editor) is a
    one-line error naming the file and line, never a UnicodeDecodeError."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}; saved as GBK?): re-save the "
                          "file as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None


def _yaml_with_lines(path: Path) -> tuple[dict, dict]:
    """Load a YAML mapping and the line of each dotted key (for error messages)."""
    text = _utf8(path)
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
    tier_path = CONFIG_DIR / "tiers" / f"{chosen}.yaml"
    if not tier_path.is_file():   # without it the tier would silently run the base config's step counts
        raise ConfigError(f"{where}: tier {chosen}: {tier_path} is missing: restore it "
                          f"(git checkout -- configs/tiers/{chosen}.yaml)")
    put_file(tier_path)
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
        rehearse(cfg, origin)
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


def tier_file(tier: str) -> dict:
    """The shipped configs/tiers/<tier>.yaml as written (what the tier is, before any user setting)."""
    return _yaml_with_lines(CONFIG_DIR / "tiers" / f"{tier}.yaml")[0]


def _writable_root(root: Path, where: str) -> None:
    """The output root is a folder, or can become one, that this user may write to."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{where}: PIPELINE_ROOT {root} is a file: point PIPELINE_ROOT at a folder")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: PIPELINE_ROOT {root} is not writable ({existing} is read-only for this "
                          "user): point PIPELINE_ROOT at a folder you own")


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
    _writable_root(Path(cfg.root), origin.get("root", "the output root"))
    if not cfg.cache_dir:
        cfg.cache_dir = str(Path(cfg.root) / ".cache")
    return cfg

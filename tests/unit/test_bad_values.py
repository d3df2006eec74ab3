"""Issue 14 §4: every user mistake is a one-line error at load, naming the file:line, variable or argument that
set the value; never a traceback, never a silent default. A generated corpus over every config field and every
environment variable, and the cases a user met (GBK files, a root that is a file, a deleted tier file).

Run: .venv/bin/python -m pytest -q tests/unit/test_bad_values.py
"""
from __future__ import annotations

import math
import typing

import pytest

from pipeline import settings
from pipeline.settings import ConfigError, load_config


def env(tmp_path, **extra) -> dict:
    return {"PIPELINE_ROOT": str(tmp_path / "out"), "MODEL_TIER": "tiny", **extra}


def _scalar(typ):
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    return args[0] if typing.get_origin(typ) in (typing.Union, __import__("types").UnionType) else typ


def bad_values(typ) -> list[str]:
    """Values that no field of this type may accept."""
    t = _scalar(typ)
    if t is bool:
        return ["maybe"]
    if t is int:
        return ["-1", "abc", "1.5"]
    if t is float:
        return ["-1", "nan", "inf", "abc"]
    return []


CORPUS = [(key, value) for key, typ in sorted(settings._known_keys().items())
          for value in bad_values(typ) if key not in ("tier",)]


def test_the_corpus_covers_every_numeric_and_boolean_field():
    keys = {k for k, _ in CORPUS}
    numeric = {k for k, t in settings._known_keys().items() if _scalar(t) in (int, float, bool)} - {"tier"}
    assert keys == numeric and len(keys) > 60, (len(keys), numeric - keys)


@pytest.mark.parametrize("key,value", CORPUS, ids=[f"{k}={v}" for k, v in CORPUS])
def test_every_bad_value_of_every_field_is_a_one_line_error_naming_its_argument(tmp_path, key, value):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[f"{key}={value}"], env=env(tmp_path))
    message = str(err.value)
    assert f"argument {key}={value}" in message and "\n" not in message, message


ENV_CASES = [(var, value) for var, keys in sorted(settings.ENV_MAP.items())
             for value in bad_values(settings._known_keys().get(keys[0].replace("@methods", "sft")))]


def test_the_env_corpus_covers_every_numeric_variable():
    assert {"SEED", "BATCH_SIZE", "GRAD_ACC", "NPROC", "ALLOW_SKIP_TRAINING", "REHEARSAL_STEPS"} <= {v for v, _ in ENV_CASES}


@pytest.mark.parametrize("var,value", ENV_CASES, ids=[f"{v}={x}" for v, x in ENV_CASES])
def test_every_bad_value_of_every_env_var_is_a_one_line_error_naming_the_variable(tmp_path, var, value):
    with pytest.raises(ConfigError) as err:
        load_config(env=env(tmp_path, **{var: value}))
    message = str(err.value)
    assert f"environment variable {var}" in message and "\n" not in message, message


def test_a_config_file_saved_in_gbk_names_the_file_and_the_fix(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "tiers").mkdir(parents=True)
    for t in settings.TIERS:
        (folder / "tiers" / f"{t}.yaml").write_text("")
    (folder / "sft.yaml").write_bytes("max_steps: 5\n# 学习率\nlearning_rate: 0.001\n".encode("gbk"))
    monkeypatch.setattr(settings, "CONFIG_DIR", folder)
    with pytest.raises(ConfigError) as err:
        load_config(env=env(tmp_path))
    message = str(err.value)
    assert f"{folder / 'sft.yaml'}:2" in message and "UTF-8" in message and "\n" not in message, message


def test_a_dotenv_saved_in_gbk_names_the_file(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes("# 密钥\nOPENAI_API_KEY=sk-x\n".encode("gbk"))
    with pytest.raises(ConfigError) as err:
        settings.environment(dotenv_path=path)
    assert f"{path}:1" in str(err.value) and "UTF-8" in str(err.value) and "sk-x" not in str(err.value)


def test_a_deleted_tier_file_is_an_error_not_the_base_config(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "tiers").mkdir(parents=True)
    monkeypatch.setattr(settings, "CONFIG_DIR", folder)
    with pytest.raises(ConfigError, match=r"tiers/tiny\.yaml.*missing.*git checkout"):
        load_config(env=env(tmp_path))


def test_a_pipeline_root_that_is_a_file_or_not_writable_is_named(tmp_path):
    afile = tmp_path / "root.txt"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"PIPELINE_ROOT.*root\.txt.*is a file"):
        load_config(env={"PIPELINE_ROOT": str(afile), "MODEL_TIER": "tiny"})
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        import os
        if os.access(locked, os.W_OK):   # root ignores permissions: nothing to show here
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(ConfigError, match=r"PIPELINE_ROOT.*not writable"):
            load_config(env={"PIPELINE_ROOT": str(locked / "out"), "MODEL_TIER": "tiny"})
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("var,value,needle", [
    ("REPORT_TO", "tensorbord", "REPORT_TO"),
    ("DEEPSPEED_CONFIG", "configs/deepspeed/no_such.json", "DEEPSPEED_CONFIG"),
])
def test_a_value_that_would_fail_only_in_the_stage_fails_at_load(tmp_path, var, value, needle):
    with pytest.raises(ConfigError) as err:
        load_config(env=env(tmp_path, **{var: value}))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_nan_is_never_a_number_a_stage_gets(tmp_path):
    cfg = load_config(env=env(tmp_path))
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in vars(cfg.sft).values())

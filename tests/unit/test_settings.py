"""The config loader: precedence, the shipped configs, and malformed input named by its place.

Run: .venv/bin/python -m pytest -q tests/unit/test_settings.py
"""
from __future__ import annotations

import json
import textwrap

import pytest
import yaml

from pipeline import settings
from pipeline.settings import ConfigError, load_config

TRAIN = ("sft", "dpo", "simpo", "kto")


@pytest.fixture
def cfg_dir(tmp_path, monkeypatch):
    """An empty configs/ folder in place of the repository's; returns write(relpath, yaml_text) -> Path."""
    folder = tmp_path / "configs"
    (folder / "tiers").mkdir(parents=True)
    for tier in settings.TIERS:   # a tier file must exist (an empty one sets nothing)
        (folder / "tiers" / f"{tier}.yaml").write_text("")
    monkeypatch.setattr(settings, "CONFIG_DIR", folder)

    def write(rel: str, text: str):
        path = folder / rel
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path
    return write


def env(tmp_path, **extra) -> dict:
    return {"PIPELINE_ROOT": str(tmp_path / "out"), "MODEL_TIER": "tiny", **extra}


# --- precedence ----------------------------------------------------------------------------------
LAYERS = ("default", "base", "section", "tier", "env", "arg")


@pytest.mark.parametrize("top", LAYERS)
def test_each_layer_overrides_the_ones_below(top, tmp_path, cfg_dir):
    """sft.grad_acc is set to a different value in every layer; the highest layer present wins."""
    upto = LAYERS[:LAYERS.index(top) + 1]
    if "base" in upto:
        cfg_dir("base.yaml", "sft:\n  grad_acc: 2\n")
    if "section" in upto:
        cfg_dir("sft.yaml", "grad_acc: 3\n")
    if "tier" in upto:
        cfg_dir("tiers/tiny.yaml", "sft: {grad_acc: 4}\n")
    extra = {"GRAD_ACC": "5"} if "env" in upto else {}
    args = ["sft.grad_acc=6"] if "arg" in upto else []
    cfg = load_config(overrides=args, env=env(tmp_path, **extra))
    assert cfg.sft.grad_acc == {"default": 8, "base": 2, "section": 3, "tier": 4, "env": 5, "arg": 6}[top]


def test_tier_file_follows_the_chosen_tier(tmp_path, cfg_dir):
    cfg_dir("tiers/tiny.yaml", "sft: {max_steps: 7}\n")
    cfg_dir("tiers/demo.yaml", "sft: {max_steps: 9}\n")
    assert load_config(env=env(tmp_path)).sft.max_steps == 7
    assert load_config(env=env(tmp_path, MODEL_TIER="demo")).sft.max_steps == 9
    assert load_config(overrides=["tier=demo"], env=env(tmp_path)).sft.max_steps == 9
    cfg_dir("base.yaml", "tier: demo\n")
    assert load_config(env={"PIPELINE_ROOT": str(tmp_path)}).sft.max_steps == 9   # tier from base.yaml


@pytest.mark.parametrize("tier", settings.TIERS)
def test_every_value_in_a_shipped_tier_file_reaches_the_config(tier, tmp_path):
    cfg = load_config(env=env(tmp_path, MODEL_TIER=tier))
    assert (cfg.tier, cfg.slug, cfg.root) == (tier, settings.SLUGS[tier], str((tmp_path / "out").resolve()))
    shipped = yaml.safe_load((settings.CONFIG_DIR / "tiers" / f"{tier}.yaml").read_text())
    assert shipped, f"configs/tiers/{tier}.yaml is empty"
    for section, values in shipped.items():
        for key, value in values.items():
            if section == "methods":   # every method's default, unless its own block in the file overrides it
                for m in settings.TRAIN_STAGES:
                    if key in cfg.section(m) and key not in (shipped.get(m) or {}):
                        assert cfg.section(m)[key] == value, f"tiers/{tier}.yaml methods.{key} -> {m}"
                continue
            assert cfg.section(section)[key] == value, f"tiers/{tier}.yaml {section}.{key}"
    for sec in TRAIN:
        train = getattr(cfg, sec)
        assert not train.curriculum or train.curriculum[-1]["until_step"] == train.max_steps


@pytest.mark.parametrize("tier", settings.GPU_TIERS)
def test_thesis_tiers_evaluate_the_full_sets(tier, tmp_path):
    cfg = load_config(env=env(tmp_path, MODEL_TIER=tier))
    assert cfg.eval.sample_sizes == {"medqa": None, "pubmedqa": None, "cmmlu": None}


def test_batch_size_and_grad_acc_apply_to_all_four_training_sections(tmp_path):
    cfg = load_config(env=env(tmp_path, BATCH_SIZE="3", GRAD_ACC="5"))
    assert [(getattr(cfg, s).batch_size, getattr(cfg, s).grad_acc) for s in TRAIN] == [(3, 5)] * 4


def test_argument_beats_env_for_one_section_only(tmp_path):
    cfg = load_config(overrides=["dpo.batch_size=7"], env=env(tmp_path, BATCH_SIZE="3"))
    assert [getattr(cfg, s).batch_size for s in TRAIN] == [3, 7, 3, 3]


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("YES", True), ("off", False),
                                           ("False", False), ("0", False)])
def test_env_flags_parse(raw, expected, tmp_path):
    assert load_config(env=env(tmp_path, ALLOW_SKIP_TRAINING=raw)).runtime.allow_skip_training is expected


def test_env_values_reach_their_fields(tmp_path):
    cfg = load_config(env=env(tmp_path, MIN_CUDA_MEM_GB_7B="20.5", ENABLE_LLM_JUDGE="true", JUDGE_MODEL="m-x",
                              OPENAI_BASE_URL="http://127.0.0.1:9/v1", DRY_RUN="1", MODEL_NAME="/models/q"))
    assert (cfg.runtime.min_cuda_mem_gb_7b, cfg.judge.enabled, cfg.judge.model, cfg.judge.base_url,
            cfg.runtime.dry_run, cfg.model.name) == (20.5, True, "m-x", "http://127.0.0.1:9/v1", True, "/models/q")


def test_empty_env_value_means_unset(tmp_path):
    assert load_config(env=env(tmp_path, BATCH_SIZE="")).sft == load_config(env=env(tmp_path)).sft


def test_dotenv_is_read_and_the_process_env_wins(tmp_path, monkeypatch):
    dotenv = tmp_path / ".env"
    dotenv.write_text("JUDGE_MODEL=from-dotenv\nBATCH_SIZE=3\nOPENAI_API_KEY=sk-dotenv-secret\n")
    monkeypatch.setenv("JUDGE_MODEL", "from-process")
    monkeypatch.delenv("BATCH_SIZE", raising=False)
    merged = settings.environment(dotenv_path=dotenv)
    cfg = load_config(env={**merged, "PIPELINE_ROOT": str(tmp_path), "MODEL_TIER": "tiny"})
    assert cfg.judge.model == "from-process"
    assert cfg.sft.batch_size == 3
    assert settings.secret("OPENAI_API_KEY", merged) == "sk-dotenv-secret"


def test_secrets_are_not_part_of_the_config(tmp_path):
    cfg = load_config(env=env(tmp_path, OPENAI_API_KEY="sk-test-SECRET-123"))
    assert "sk-test-SECRET-123" not in json.dumps(cfg.to_dict(), default=str)
    assert not any("api_key" in k.lower() for k in settings._known_keys())


def test_tiny_env_fixture_gives_a_clean_tiny_config(tiny_env):
    cfg = load_config()
    assert cfg.tier == "tiny" and cfg.root == str(tiny_env.resolve()) and not cfg.judge.enabled


# --- malformed input: every message names its place -----------------------------------------------
# (files to write, env extra, overrides, substrings the message must contain)
MALFORMED = {
    "unknown key in a section file": (
        {"sft.yaml": "max_steps: 5\nmax_stepz: 6\n"}, {}, [], ["sft.yaml:2", "sft.max_stepz"]),
    "unknown section in base.yaml": (
        {"base.yaml": "tier: tiny\ntrainer:\n  epochs: 1\n"}, {}, [], ["base.yaml:2", "trainer"]),
    "unknown key in a tier file": (
        {"tiers/tiny.yaml": "lora:\n  r: 4\n  rank: 4\n"}, {}, [], ["tiny.yaml:3", "lora.rank"]),
    "unclosed list": (
        {"base.yaml": "tier: tiny\nsft:\n  max_steps: [1, 2\n  grad_acc: 3\n"}, {}, [], ["base.yaml:4", "not valid YAML"]),
    "bad indentation": (
        {"base.yaml": "tier: tiny\nsft:\n  max_steps: 3\n   grad_acc: 3\n"}, {}, [], ["base.yaml:4", "not valid YAML"]),
    "file is a list, not a mapping": (
        {"eval.yaml": "- medqa\n- cmmlu\n"}, {}, [], ["eval.yaml:1", "mapping"]),
    "duplicate key": (
        {"base.yaml": "sft:\n  max_steps: 5\nlora:\n  r: 4\nsft:\n  grad_acc: 2\n"}, {}, [], ["base.yaml:5", "sft"]),
    "python tag": (
        {"sft.yaml": "max_steps: 5\noptimizer: !!python/object/apply:os.getcwd []\n"}, {}, [], ["sft.yaml:2"]),
    "text where an integer belongs": (
        {"dpo.yaml": "beta: 0.1\nmax_steps: many\n"}, {}, [], ["dpo.yaml:2", "dpo.max_steps", "many"]),
    "fractional step count": (
        {"kto.yaml": "max_steps: 2.5\n"}, {}, [], ["kto.yaml:1", "kto.max_steps"]),
    "null where a string belongs": (
        {"judge.yaml": "enabled: false\nmodel:\n"}, {}, [], ["judge.yaml:2", "judge.model"]),
    "curriculum does not end at max_steps": (
        {"tiers/tiny.yaml": "sft:\n  max_steps: 10\n  curriculum: [{max_length: 64, until_step: 8}]\n"}, {}, [],
        ["tiny.yaml:", "curriculum ends at step 8", "max_steps is 10"]),
    "curriculum entry with a wrong key": (
        {"sft.yaml": "max_steps: 8\ncurriculum: [{max_len: 64, until_step: 8}]\n"}, {}, [],
        ["sft.yaml:2", "curriculum[0]"]),
    "optimizer not allowed": (
        {"simpo.yaml": "beta: 2.0\noptimizer: adam\n"}, {}, [], ["simpo.yaml:2", "adam", "adamw_torch"]),
    "on_bad_row=drop": (
        {"base.yaml": "data:\n  seed: 1\n  on_bad_row: drop\n"}, {}, [], ["base.yaml:3", "on_bad_row", "drop"]),
    "lora dropout out of range (line of dropout, not of r)": (
        {"tiers/tiny.yaml": "lora:\n  r: 8\n  alpha: 16\n  dropout: 1.5\n"}, {}, [], ["tiny.yaml:4", "lora.dropout"]),
    "unknown eval set": (
        {"eval.yaml": "seed: 1\nsets: [medqa, usmle]\n"}, {}, [], ["eval.yaml:2", "usmle"]),
    "unknown eval sample size key": (
        {"eval.yaml": "sample_sizes: {medqa: 8, pubmedq: 8}\n"}, {}, [], ["eval.yaml:1", "pubmedq"]),
    "tier in base.yaml not known": (
        {"base.yaml": "tier: huge\n"}, {"MODEL_TIER": ""}, [], ["base.yaml:1", "huge", "tiny, demo, 7b, 14b"]),
    "ALLOW_SKIP_TRAINING=maybe": (
        {}, {"ALLOW_SKIP_TRAINING": "maybe"}, [], ["ALLOW_SKIP_TRAINING", "maybe", "true", "false"]),
    "BATCH_SIZE=abc": ({}, {"BATCH_SIZE": "abc"}, [], ["BATCH_SIZE", "abc"]),
    "BATCH_SIZE=0": ({}, {"BATCH_SIZE": "0"}, [], ["BATCH_SIZE", "batch_size must be >= 1"]),
    "MIN_CUDA_MEM_GB_7B=lots": ({}, {"MIN_CUDA_MEM_GB_7B": "lots"}, [], ["MIN_CUDA_MEM_GB_7B", "lots"]),
    "MODEL_TIER=huge": ({}, {"MODEL_TIER": "huge"}, [], ["MODEL_TIER", "huge", "tiny, demo, 7b, 14b"]),
    "NPROC=0": ({}, {"NPROC": "0"}, [], ["NPROC", "nproc must be >= 1"]),
    "ENABLE_LLM_JUDGE=2": ({}, {"ENABLE_LLM_JUDGE": "2"}, [], ["ENABLE_LLM_JUDGE", "accepted values"]),
    "unknown key=value argument": ({}, {}, ["sft.max_stepz=5"], ["argument sft.max_stepz=5", "unknown key"]),
    "argument without =": ({}, {}, ["max_steps"], ["argument 'max_steps'", "key=value"]),
    "negative max_steps argument": ({}, {}, ["sft.max_steps=-1"], ["argument sft.max_steps=-1", "max_steps"]),
    "tier argument not known": ({}, {}, ["tier=huge"], ["argument tier=huge", "tiny, demo, 7b, 14b"]),
    "mapping argument that is not a mapping": (
        {}, {}, ["eval.sample_sizes=medqa"], ["argument eval.sample_sizes=medqa", "mapping"]),
    "negative eval sample size": ({}, {}, ["eval.sample_sizes={medqa: -1}"], ["eval.sample_sizes", "medqa", ">= 1"]),
    "zero eval sample size": ({}, {}, ["eval.sample_sizes={cmmlu: 0}"], ["eval.sample_sizes", "cmmlu", "null"]),
    "non-numeric eval sample size": ({}, {}, ["eval.sample_sizes={medqa: many}"], ["argument eval.sample_sizes", "medqa"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_names_the_place(case, tmp_path, cfg_dir):
    files, extra, args, needles = MALFORMED[case]
    for rel, text in files.items():
        cfg_dir(rel, text)
    with pytest.raises(ConfigError) as err:
        load_config(overrides=args, env=env(tmp_path, **extra))
    message = str(err.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"{case}: message lacks {missing}: {message}"
    assert "\n" not in message, "an error is one line"


def test_duplicate_keys_in_a_section_file_are_an_error(tmp_path, cfg_dir):
    cfg_dir("sft.yaml", "max_steps: 5\ngrad_acc: 2\nmax_steps: 9\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml:3.*max_steps"):
        load_config(env=env(tmp_path))


def test_cli_prints_a_config_error_and_exits_2(tmp_path, capsys, monkeypatch):
    from pipeline.__main__ import main
    monkeypatch.setattr(settings, "environment", lambda dotenv_path=None: env(tmp_path, BATCH_SIZE="abc"))
    assert main(["config"]) == 2
    assert "BATCH_SIZE" in capsys.readouterr().out


def test_env_flag_parses_like_the_config_and_names_the_variable(tiny_env, monkeypatch):
    assert settings.env_flag("DAY1_DRY_RUN", default=True) is True        # unset: the default
    monkeypatch.setenv("DAY1_DRY_RUN", "no")
    assert settings.env_flag("DAY1_DRY_RUN", default=True) is False
    monkeypatch.setenv("DAY1_DRY_RUN", "maybe")
    with pytest.raises(ConfigError, match="environment variable DAY1_DRY_RUN.*maybe.*accepted values"):
        settings.env_flag("DAY1_DRY_RUN")


def test_smoke_tiers_judge_only_with_a_key_unless_a_flag_is_explicit():
    from pipeline.settings import load_config
    no_key = load_config(tier="demo", env={})
    assert not no_key.judge.enabled and not no_key.judge.risk_enabled
    with_key = load_config(tier="demo", env={"OPENAI_API_KEY": "sk-x"})
    assert with_key.judge.risk_enabled            # the configured default (true) applies
    explicit = load_config(tier="tiny", env={"ENABLE_LLM_RISK_JUDGE": "true"})
    assert explicit.judge.risk_enabled            # an explicit flag wins, and then fails loudly without a key
    assert load_config(tier="7b", env={}).judge.risk_enabled   # thesis tiers keep the CONTRACT default


def test_a_methods_block_sets_every_method_and_a_method_block_overrides_it(tmp_path):
    cfg = load_config(env=env(tmp_path, MODEL_TIER="tiny"))
    assert {m: getattr(cfg, m).max_length for m in settings.TRAIN_STAGES if m != "sft"} == {
        m: 256 for m in settings.TRAIN_STAGES if m != "sft"}
    assert cfg.simpo.learning_rate == 2.0e-3 and cfg.dpo.learning_rate == 5.0e-3 and cfg.sft.learning_rate == 3.0e-2


def test_a_methods_key_no_method_has_is_an_error_naming_the_file(cfg_dir):
    cfg_dir("tiers/tiny.yaml", "methods: {no_such_knob: 3}\n")
    with pytest.raises(ConfigError, match=r"tiny\.yaml:1: key 'methods\.no_such_knob'.*unknown key"):
        load_config(tier="tiny", env={})

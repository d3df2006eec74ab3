"""Shared fixtures.  Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests"""
from __future__ import annotations

import functools

import pytest

# Variables that change the resolved config (pipeline.settings.ENV_MAP) or that hold secrets:
# a developer's shell must not leak into the tests.
_CLEARED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MODEL_NAME", "ALLOW_SKIP_TRAINING", "FORCE_SKIP_TRAINING",
            "ENABLE_LLM_JUDGE", "ENABLE_LLM_RISK_JUDGE", "ENABLE_V2_LLM_FALLBACK", "JUDGE_MODEL",
            "MIN_CUDA_MEM_GB_7B", "MIN_CUDA_MEM_GB_14B", "BATCH_SIZE", "GRAD_ACC", "NPROC", "DAY1_DRY_RUN",
            "DRY_RUN", "SEED", "MEDLLM_INJECT_OOM_AT_STEP", "MEDLLM_INJECT_OOM_RANK", "GPU_PROBE_FILE", "REHEARSAL",
            "REHEARSAL_STEPS", "QLORA", "DEEPSPEED_CONFIG", "MEDLLM_CACHE", "BUDGET", "GPU_PRICE_PER_HOUR",
            "MERGE_FINAL", "SEEDS", "HF_ENDPOINT", "MODEL_HUB")


@pytest.fixture
def tiny_env(tmp_path, monkeypatch):
    """A clean tiny-tier environment whose output root is tmp_path; returns tmp_path.

    Sets PIPELINE_ROOT, MODEL_TIER=tiny and HF_HUB_OFFLINE=1, clears the config variables above, and
    makes pipeline.settings read `.env` from tmp_path (absent unless a test writes one)
    instead of the repository's, so load_config() in-process sees only what the test set.
    """
    for var in _CLEARED:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    monkeypatch.setenv("MODEL_TIER", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipeline import settings
    monkeypatch.setattr(settings, "environment",
                        functools.partial(settings.environment, dotenv_path=tmp_path / ".env"))
    return tmp_path


@pytest.fixture(scope="session")
def tiny_day1(tmp_path_factory):
    """One real tiny-tier Day-1 (`run all` with the judges off, then the dry run), shared by the training and
    e2e modules: (root, pristine backup, env). Tests that change files restore them from the backup."""
    import shutil
    from pipeline.__main__ import main
    root = tmp_path_factory.mktemp("tiny_day1")
    env = {"PIPELINE_ROOT": str(root), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for var in _CLEARED:
            mp.delenv(var, raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["run", "all"]) == 0
        assert main(["run", "dry_run"]) == 0
    backup = tmp_path_factory.mktemp("tiny_day1_backup") / "root"
    shutil.copytree(root, backup)
    return root, backup, env


@pytest.fixture
def day1_env(tiny_day1, monkeypatch):
    """The shared Day-1's environment for one test; its files are restored afterwards."""
    import shutil
    root, backup, env = tiny_day1
    for var in _CLEARED:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield root
    shutil.rmtree(root)
    shutil.copytree(backup, root)

"""Shared fixtures.  Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests"""
from __future__ import annotations

import functools

import pytest

# Variables that change the resolved config (pipeline.settings.ENV_MAP) or that hold secrets:
# a developer's shell must not leak into the tests.
_CLEARED = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MODEL_NAME", "ALLOW_SKIP_TRAINING", "FORCE_SKIP_TRAINING",
            "ENABLE_LLM_JUDGE", "ENABLE_LLM_RISK_JUDGE", "ENABLE_V2_LLM_FALLBACK", "JUDGE_MODEL",
            "MIN_CUDA_MEM_GB_7B", "MIN_CUDA_MEM_GB_14B", "BATCH_SIZE", "GRAD_ACC", "NPROC", "DAY1_DRY_RUN",
            "DRY_RUN", "SEED", "MEDLLM_INJECT_OOM_AT_STEP")


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

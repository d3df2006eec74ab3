"""Test fakes. Fixture use: `from tests.fakes import fake_openai` in a test module or conftest.py."""
from contextlib import contextmanager

import pytest

__all__ = ["FakeOpenAI", "fake_reply", "start_fake_openai", "fake_openai", "FAKE_KEY"]

FAKE_KEY = "sk-fake-SECRET-do-not-leak-7f3a9c"


def __getattr__(name):  # lazy, so `python -m tests.fakes.openai_server` runs the module only once
    if name in ("FakeOpenAI", "fake_reply"):
        from tests.fakes import openai_server
        return getattr(openai_server, name)
    raise AttributeError(name)


@contextmanager
def start_fake_openai(**kwargs):
    """A running FakeOpenAI on a free 127.0.0.1 port (kwargs as FakeOpenAI's), stopped on exit."""
    from tests.fakes.openai_server import FakeOpenAI

    kwargs.setdefault("api_key", FAKE_KEY)
    with FakeOpenAI(**kwargs) as server:
        yield server


@pytest.fixture
def fake_openai():
    """A fresh fake server per test; its key is FAKE_KEY, its URL `.base_url`."""
    with start_fake_openai() as server:
        yield server

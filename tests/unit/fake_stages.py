"""Fake stages for the engine tests: fake_a -> fake_b (training) -> fake_c, no model anywhere.

In-process: `install(monkeypatch, data_file)` swaps them into the registry. As a script (for the kill, log
and lock tests, which need a second process):  python tests/unit/fake_stages.py ROOT DATA_FILE BEHAVIOUR [N]
runs `engine.run(["fake_a"])` N times (forced after the first) with fake_a doing BEHAVIOUR.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import engine  # noqa: E402
from pipeline.engine import SkipStage, Stage  # noqa: E402

NAMES = ("fake_a", "fake_b", "fake_c")
CALLS: Counter = Counter()      # run() calls per stage
BEHAVIOUR: dict = {}            # stage name -> callable(ctx) -> dict, replacing the default
OUTPUT_TEXT: dict = {}          # stage name -> text its default run writes to out/<name>.txt


def evidence_rel(name: str) -> str:
    return f"reports/fake/{name}.json"


def registry(data_file: Path) -> list[Stage]:
    return [
        Stage("fake_a", (), lambda c: evidence_rel("fake_a"), inputs=lambda c: [data_file], sections=("sft",)),
        Stage("fake_b", ("fake_a",), lambda c: evidence_rel("fake_b"), sections=("dpo",), training=True),
        Stage("fake_c", ("fake_b",), lambda c: evidence_rel("fake_c"), sections=("eval",)),
    ]


def default_run(ctx) -> dict:
    out = ctx.path(f"out/{ctx.name}.txt")
    out.write_text(OUTPUT_TEXT.get(ctx.name, f"{ctx.name} output\n"))
    return {"outputs": [f"out/{ctx.name}.txt"], "answer": 42}


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(f"pipeline.stages.{name}", f"fake stage {name}")

    def run(ctx):
        CALLS[name] += 1
        return BEHAVIOUR.get(name, default_run)(ctx)
    module.run = run
    return module


def install(monkeypatch, data_file: Path) -> list[Stage]:
    """Make the engine see only the fake stages (undone by monkeypatch at test end)."""
    import pipeline.stages
    stages = registry(data_file)
    monkeypatch.setattr(engine, "STAGE_BY_NAME", {s.name: s for s in stages})
    monkeypatch.setattr(pipeline.stages, "STAGES", stages)
    for name in NAMES:
        monkeypatch.setitem(sys.modules, f"pipeline.stages.{name}", _module(name))
    CALLS.clear(), BEHAVIOUR.clear(), OUTPUT_TEXT.clear()
    return stages


# --- behaviours used from the script ---------------------------------------------------------------
def sleep_forever(ctx):
    print("fake_a is sleeping", flush=True)
    time.sleep(120)
    return {}


def noisy(ctx):
    print("line on stdout from print()", flush=True)
    print("line on stderr from print()", file=sys.stderr, flush=True)
    subprocess.run(["sh", "-c", "echo line from a child process"], check=True)
    os.write(2, b"line written to fd 2\n")
    return {}


def skipping(ctx):
    raise SkipStage("no GPU here")


def main(root: str, data_file: str, behaviour: str, times: int = 1) -> int:
    from rich.console import Console
    from pipeline.settings import load_config

    class _Patch:   # the two monkeypatch calls install() makes, without pytest
        setattr = staticmethod(setattr)

        @staticmethod
        def setitem(mapping, key, value):
            mapping[key] = value
    install(_Patch, Path(data_file))
    BEHAVIOUR["fake_a"] = globals()[behaviour]
    cfg = load_config(env={"PIPELINE_ROOT": root, "MODEL_TIER": "tiny"})
    codes = [engine.run(["fake_a"], cfg, Console(), force=i > 0) for i in range(times)]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])))

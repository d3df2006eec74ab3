"""Fake stages for the engine tests: fake_a -> fake_b (training) -> fake_c, no model anywhere.

In-process: `install(data_file)` returns a fake registry that the tests hand to the engine. As a script (for the kill, log
and lock tests, which need a second process):  python tests/unit/fake_stages.py ROOT DATA_FILE BEHAVIOUR [N]
runs `engine.run(["fake_a"])` N times (forced after the first) with fake_a doing BEHAVIOUR.
"""
from __future__ import annotations

import os
import dataclasses
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline import engine  # noqa: E402
from pipeline.core import Registry, SkipStage, Stage  # noqa: E402

NAMES = ("fake_a", "fake_b", "fake_c")
CALLS: Counter = Counter()      # run() calls per stage
BEHAVIOUR: dict = {}            # stage name -> callable(ctx) -> dict, replacing the default
OUTPUT_TEXT: dict = {}          # stage name -> text its default run writes to out/<name>.txt


def evidence_rel(name: str) -> str:
    return f"reports/fake/{name}.json"


def _run(name: str):
    def run(ctx):
        CALLS[name] += 1
        return BEHAVIOUR.get(name, default_run)(ctx)
    return run


def registry(data_file: Path, **changes) -> Registry:
    """A registry of three fake stages; `changes` = {stage name: {field: value}} alters a declaration."""
    stages = [
        Stage("fake_a", evidence_rel("fake_a"), inputs=lambda c: [data_file], reads=("sft",), run=_run("fake_a")),
        Stage("fake_b", evidence_rel("fake_b"), needs=("fake_a",), reads=("dpo",), training=True, run=_run("fake_b")),
        Stage("fake_c", evidence_rel("fake_c"), needs=("fake_b",), reads=("eval",), run=_run("fake_c")),
    ]
    return Registry([dataclasses.replace(s, **changes.get(s.name, {})) for s in stages])


def default_run(ctx) -> dict:
    out = ctx.path(f"out/{ctx.name}.txt")
    out.write_text(OUTPUT_TEXT.get(ctx.name, f"{ctx.name} output\n"))
    return {"outputs": [f"out/{ctx.name}.txt"], "answer": 42}


def install(data_file: Path, **changes) -> Registry:
    """A fresh fake registry with the call counters cleared (the engine is handed it; nothing is patched)."""
    CALLS.clear(), BEHAVIOUR.clear(), OUTPUT_TEXT.clear()
    return registry(data_file, **changes)


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

    reg = install(Path(data_file))
    BEHAVIOUR["fake_a"] = globals()[behaviour]
    cfg = load_config(env={"PIPELINE_ROOT": root, "MODEL_TIER": "tiny"})
    codes = [engine.run(["fake_a"], cfg, Console(), reg, force=i > 0) for i in range(times)]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])))

"""make chat on the shared tiny Day-1: one-shot answers equal eval's own greedy generation (base, a trained
variant, its merged folder); refusals are one line with a non-zero exit (unknown or untrained variant, a final or
merged folder that does not re-hash, bad arguments); the terminal chat streams an answer in a pseudo-terminal.

Run: HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests/integration/test_chat.py (the refusals and the in-process
one-shots run in make test; the pseudo-terminal, `make chat` and the merged folders in make test-slow)
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import chat
from pipeline.stages import REGISTRY

REPO = Path(__file__).resolve().parents[2]
QUESTION = "Which organ pumps blood through the human body?"
TOKENS = 16   # MAX_NEW_TOKENS of these tests


def eval_answer(name: str, prompt: str = QUESTION, system: str | None = None, folder: Path | None = None) -> str:
    """What eval's own code answers: its stage's context, variants.Variants.use (or a plain load of a merged
    folder, as export_merged checks it), variants.generate at the eval batch size."""
    from rich.console import Console

    from pipeline import engine
    from pipeline.settings import load_config
    from pipeline.variants import Variants, generate
    cfg = load_config()
    ctx = engine.make_ctx(REGISTRY["eval"], cfg, Console(), REGISTRY)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    plan = {**ctx.plan, "quantization": None} if folder else None
    with Variants(ctx, plan) as vs:
        model, tok = vs.load(folder) if folder else vs.use(name)
        return generate(model, tok, [messages], cfg.eval.batch_size, TOKENS)[0]


def one_shot(capsys, *argv: str) -> tuple[int, str, str]:
    code = chat.cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def final_dir(root: Path, name: str) -> Path:
    return root / json.loads((root / REGISTRY[name].evidence_path.format(slug="tiny")).read_text())["checkpoint_dir"]


# --- one answer, equal to eval's ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param("base", marks=pytest.mark.slow), pytest.param("sft", marks=pytest.mark.slow)])   # 2-3 s each, idle
def test_one_shot_answers_like_eval(day1_env, capsys, monkeypatch, name):
    monkeypatch.setenv("PROMPT", QUESTION)
    monkeypatch.setenv("MAX_NEW_TOKENS", str(TOKENS))
    code, out, err = one_shot(capsys, "--variant", name)
    assert code == 0, err
    expected = eval_answer(name)
    assert expected and out == expected + "\n"
    assert f"chat: {name}: " in err and ("verified" in err) == (name != "base")


@pytest.mark.slow   # loads a model (the sft one-shot above stays in make test)
def test_one_shot_with_a_system_prompt_answers_like_eval(day1_env, capsys):
    system = "You are a careful physician."
    code, out, _ = one_shot(capsys, "--variant", "dpo", "--prompt", "a=b?", "--system", system,
                            "--max-new-tokens", str(TOKENS))
    assert code == 0 and out == eval_answer("dpo", "a=b?", system) + "\n"   # a prompt may hold '='


class WordTokenizer:
    """A stand-in tokenizer: one token per word of the rendered chat."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + (" <assistant>" * add_generation_prompt)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}


def test_the_history_loses_its_oldest_turns_when_it_outgrows_the_context():
    head, question = [{"role": "system", "content": "be brief"}], {"role": "user", "content": "q3 ?"}
    history = [{"role": r, "content": f"{r[0]}{i} " * 5} for i in (1, 2) for r in ("user", "assistant")]
    full = len(WordTokenizer()(WordTokenizer().apply_chat_template(head + history + [question]))["input_ids"])
    assert chat.trim(WordTokenizer(), head, history, question, None, 10) == history   # no known context
    assert chat.trim(WordTokenizer(), head, history, question, full + 10, 10) == history
    assert chat.trim(WordTokenizer(), head, history, question, full + 9, 10) == history[2:]   # one turn too long
    assert chat.trim(WordTokenizer(), head, history, question, 5, 10) == []   # the question alone stays


# --- refusals: one line, non-zero, before any model loads -----------------------------------------------------
def refused(capsys, *argv) -> tuple[int, str]:
    code, out, err = one_shot(capsys, *argv)
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("chat: "), err
    return code, lines[0]


def test_a_tampered_final_is_refused_like_eval_refuses_it(day1_env, capsys):
    adapter = final_dir(day1_env, "sft") / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes() + b"\0")
    code, line = refused(capsys, "--variant", "sft", "--prompt", QUESTION)
    assert code == 1 and "does not match the hashes in its metrics" in line and "adapter_model.safetensors" in line
    assert "refusing to load it" in line


def test_an_untrained_variant_names_the_command_that_trains_it(day1_env, capsys):
    (day1_env / REGISTRY["kto"].evidence_path).unlink()
    code, line = refused(capsys, "--variant", "kto", "--prompt", QUESTION)
    assert code == 1 and "kto has not been trained yet" in line and "`make gpu-run`" in line


@pytest.mark.parametrize("argv, env, says", [
    (["--variant", "ppo"], {}, "'ppo' is not a variant (VARIANT, --variant): use one of "
     + ", ".join(REGISTRY.variants)),
    ([], {}, "name a variant: make chat VARIANT=<base|"),
    (["--variant", "sft"], {"MAX_NEW_TOKENS": "0"}, "environment variable MAX_NEW_TOKENS: '0' is not a whole"),
    (["--variant", "sft"], {"MERGED": "maybe"}, "environment variable MERGED: cannot parse 'maybe'"),
    (["--variant", "base", "--merged"], {}, "MERGED=true: the base variant has no merged folder"),
    (["--variant", "sft", "sft.max_steps=x"], {}, "config error: argument sft.max_steps=x"),
])
def test_bad_arguments_are_one_line(tiny_env, capsys, monkeypatch, argv, env, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "--merged" in argv:   # checked with the plan: a recorded one, no probe of this machine
        (tiny_env / "reports/migration").mkdir(parents=True)
        (tiny_env / "reports/migration/gpu_check.json").write_text(json.dumps({"plan": {"feasible": True}}))
    code, line = refused(capsys, *argv)
    assert code == 2 and says in line, line


@pytest.mark.parametrize("plan, says", [
    (None, "no hardware plan: run `make gpu-check`"),
    ({"feasible": False, "feasible_reason": "no CUDA device"}, "cannot run the tiny tier (no CUDA device)"),
])
def test_a_machine_without_a_runnable_plan_is_one_line(tiny_env, capsys, plan, says):
    if plan is not None:
        (tiny_env / "reports/migration").mkdir(parents=True)
        (tiny_env / "reports/migration/gpu_check.json").write_text(json.dumps({"plan": plan}))
    code, line = refused(capsys, "--variant", "base", "--prompt", QUESTION)
    assert code == 1 and says in line, line


# --- the merged folders (make export-merged) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_root(tiny_day1, tmp_path_factory):
    """A copy of the shared Day-1 after `make export-merged` (every variant's merged folder passed parity)."""
    from pipeline.__main__ import main
    from tests.conftest import _CLEARED
    _, backup, env = tiny_day1
    root = tmp_path_factory.mktemp("chat_merged") / "root"
    shutil.copytree(backup, root)
    with pytest.MonkeyPatch.context() as mp:
        for var in _CLEARED:
            mp.delenv(var, raising=False)
        for k, v in {**env, "PIPELINE_ROOT": str(root)}.items():
            mp.setenv(k, v)
        assert main(["run", "export_merged"]) == 0
    return root, {**env, "PIPELINE_ROOT": str(root)}


@pytest.fixture
def merged_env(merged_root, monkeypatch):
    from tests.conftest import _CLEARED
    root, env = merged_root
    for var in _CLEARED:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return root


@pytest.mark.slow   # one export_merged run (make test-slow)
def test_the_merged_folder_is_the_default_and_answers_like_eval_on_it(merged_env, capsys):
    folder = final_dir(merged_env, "sft").parent / "merged"
    code, out, err = one_shot(capsys, "--variant", "sft", "--prompt", QUESTION, "--max-new-tokens", str(TOKENS))
    assert code == 0 and f"merged folder {folder.relative_to(merged_env).as_posix()}, verified" in err
    assert out == eval_answer("sft", folder=folder) + "\n"
    code, out, err = one_shot(capsys, "--variant", "sft", "--prompt", QUESTION, "--max-new-tokens", str(TOKENS),
                              "--no-merged")
    assert code == 0 and "adapter " in err and out == eval_answer("sft") + "\n"


@pytest.mark.slow   # one export_merged run (make test-slow)
def test_a_tampered_merged_folder_is_refused_or_passed_over(merged_env, capsys, monkeypatch):
    weights = final_dir(merged_env, "orpo").parent / "merged" / "model.safetensors"
    honest = weights.read_bytes()
    weights.write_bytes(honest[:-1] + bytes([honest[-1] ^ 1]))
    try:
        monkeypatch.setenv("MERGED", "true")
        code, line = refused(capsys, "--variant", "orpo", "--prompt", QUESTION)
        assert code == 1 and "does not match the hashes its parity check recorded" in line, line
        monkeypatch.setenv("MERGED", "auto")   # the default: the verified adapter instead, and why
        code, out, err = one_shot(capsys, "--variant", "orpo", "--prompt", QUESTION)
        assert code == 0 and out.strip() and "adapter " in err and "model.safetensors, changed" in err
    finally:
        weights.write_bytes(honest)


# --- through make, and the terminal chat in a pseudo-terminal --------------------------------------------------
def subprocess_env(root, **extra) -> dict:
    from tests.conftest import _CLEARED
    env = {k: v for k, v in os.environ.items() if k not in (*_CLEARED, *chat.ENV.values(), "MERGED")}
    return env | {"PIPELINE_ROOT": str(root), "MODEL_TIER": "tiny", "HF_HUB_OFFLINE": "1"} | extra


@pytest.mark.slow   # two processes that import torch (make test-slow)
def test_make_chat_one_shot_and_refusal(tiny_day1):
    root = tiny_day1[0]
    run = subprocess.run(["make", "-s", "chat", "VARIANT=simpo"], cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env(root, PROMPT=QUESTION, MAX_NEW_TOKENS=str(TOKENS)), timeout=600)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    bad = subprocess.run(["make", "-s", "chat", "VARIANT=ppo"], cwd=REPO, capture_output=True, text=True,
                         env=subprocess_env(root), timeout=600)
    assert bad.returncode != 0 and bad.stdout == "" and "chat: 'ppo' is not a variant" in bad.stderr


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    """The parent's side of a pseudo-terminal: what the chat showed (escape codes removed), read up to a marker."""

    def __init__(self, fd: int):
        self.fd, self.text, self.pos = fd, "", 0

    def until(self, marker: str, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while marker not in self.text[self.pos:]:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; the terminal showed {self.text[-2000:]!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:   # the child closed the terminal
                raise AssertionError(f"the chat ended before {marker!r}: {self.text[-2000:]!r}") from None
            self.text += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r", "")
        end = self.text.index(marker, self.pos) + len(marker)
        shown, self.pos = self.text[self.pos:end], end
        return shown

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


@pytest.mark.slow   # a process that imports torch, in a pseudo-terminal (make test-slow)
def test_the_terminal_chat_streams_an_answer_resets_and_exits(day1_env):
    import pty
    expected = " ".join(eval_answer("sft").split())   # whitespace folded, as a terminal shows it
    env = subprocess_env(day1_env, MAX_NEW_TOKENS=str(TOKENS), COLUMNS="2000", TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:   # the child: the chat on the terminal
        try:
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "pipeline", "chat", "--variant", "sft"], env)
        finally:
            os._exit(127)
    term = Terminal(fd)
    try:
        term.until("you> ")
        term.send(QUESTION)
        shown = term.until("you> ")
        term.send("/help")
        assert chat.HELP in term.until("you> ")
        term.send("/reset")
        assert "(history cleared)" in term.until("you> ")
        term.send("/exit")
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, term.text[-2000:]
    reply = shown.split("sft> ", 1)[1].rsplit("you> ", 1)[0]
    assert expected and expected in " ".join(reply.split()), (expected, shown)

"""A terminal chat with the base model or a trained variant.  Run: make chat VARIANT=sft
(python -m pipeline chat --variant sft [--system TEXT] [--prompt TEXT] [--max-new-tokens N] [--merged|--no-merged]
[key=value ...]; the same from the environment: VARIANT, SYSTEM_PROMPT, PROMPT, MAX_NEW_TOKENS, MERGED)

`PROMPT="..."` (or --prompt) answers once on stdout and exits 0: for scripts and tests. Without it, a chat in the
terminal (rich): the answer streams token by token (transformers' TextStreamer), the history is kept over the turns
(dropped from the oldest turn when it outgrows the model's context), /reset clears it, /exit or Ctrl-D quits.

What it talks to is what eval scores: the variants of pipeline/variants.py (the registry's, `base` first), loaded
by the same code on the hardware plan's device and dtype, one model alive (variants.Variants), with the variant's
tokenizer and chat template, eval's greedy decoding and eos ids (variants.generate). A trained variant's final
adapter is re-hashed against its training metrics first (variants.verified_adapter, as eval does): one that does not
match is refused. Its merged folder (make export-merged) is used instead when its parity check passed, it was merged
from that very final and its files re-hash to what the check recorded; MERGED=true insists on it (a refusal when it
cannot be used), MERGED=false takes the adapter. Writes no evidence.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import evidence as ev

DEFAULT_MAX_NEW_TOKENS = 256
HELP = "/reset clears the history, /exit (or Ctrl-D) quits"
ENV = {"variant": "VARIANT", "system": "SYSTEM_PROMPT", "prompt": "PROMPT", "max_new_tokens": "MAX_NEW_TOKENS"}


class ChatError(Exception):
    """One line for the user and the exit code: 2 for a wrong argument, 1 for what cannot be loaded."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def options(argv: list[str]) -> argparse.Namespace:
    """Arguments over the environment (read through pipeline.settings); key=value words are config overrides."""
    from pipeline import settings
    parser = argparse.ArgumentParser(prog="python -m pipeline chat", description=__doc__.split("\n")[0])
    parser.add_argument("--variant", help="base or a trained variant (env VARIANT)")
    parser.add_argument("--system", help="a system prompt for every turn (env SYSTEM_PROMPT)")
    parser.add_argument("--prompt", help="answer this once on stdout and exit (env PROMPT)")
    parser.add_argument("--max-new-tokens", help=f"per answer (env MAX_NEW_TOKENS, default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--merged", action=argparse.BooleanOptionalAction, default=None,
                        help="the merged folder (--merged) or the adapter (--no-merged); default (env MERGED unset "
                             "or auto): the merged folder when it passed its parity check, else the adapter")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, as for `python -m pipeline run`")
    args = parser.parse_args(argv)
    env = settings.environment()
    where = {}
    for key, var in ENV.items():
        if getattr(args, key) is None and env.get(var):
            setattr(args, key, env[var])
            where[key] = f"environment variable {var}"
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ChatError(f"argument {bad[0]!r}: expected key=value (e.g. eval.seed=1) or an option (see --help)", 2)
    if args.merged is None and env.get("MERGED", "auto").strip().lower() not in ("", "auto"):
        try:
            args.merged = settings.env_flag("MERGED")
        except settings.ConfigError as exc:
            raise ChatError(f"{exc}, or auto (the default)", 2) from None
    raw = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    try:
        args.max_new_tokens = int(raw)
        if args.max_new_tokens < 1:
            raise ValueError
    except ValueError:
        src = where.get("max_new_tokens", "--max-new-tokens")
        raise ChatError(f"{src}: {raw!r} is not a whole number >= 1 (the most tokens of one answer)", 2) from None
    return args


def merged_folder(ctx, name: str, metrics: dict) -> tuple[Path | None, str | None]:
    """(the variant's merged folder, None) when it may stand in for its adapter, else (None, why not): its parity
    check (reports/export/merge_parity.json) passed, it was merged from the current final, its files re-hash."""
    parity = ctx.evidence("export_merged")
    entry = ((parity or {}).get("variants") or {}).get(name)
    if not isinstance(entry, dict) or entry.get("status") not in ("exported", "failed"):
        return None, "none was made (`make export-merged` makes it)"
    if entry["status"] != "exported":
        return None, f"it failed its parity check ({entry.get('reason')}) and is kept aside"
    if entry.get("adapter_sha256") != metrics.get("checkpoint_sha256"):
        return None, "it was merged from an earlier final: re-run `make export-merged`"
    folder = ctx.root / entry["merged_dir"]
    if not folder.is_dir():
        return None, f"{entry['merged_dir']} is missing: re-run `make export-merged`"
    _, diff = ev.verify_tree(folder, entry.get("files"))
    if diff:
        kind, paths = next(iter(diff.items()))
        return None, (f"{entry['merged_dir']} does not match the hashes its parity check recorded "
                      f"(first difference: {paths[0]}, {kind}): re-run `make export-merged`")
    return folder, None


def source(ctx, name: str, merged: bool | None) -> dict:
    """What to load for the variant, all checked before any model loads: {"kind": "base" | "adapter" | "merged",
    "path", "note"}. Raises ChatError for an unknown or untrained variant, a final that does not re-hash, a
    machine whose plan runs no model, and MERGED=true without a usable merged folder."""
    from pipeline import models
    from pipeline.core import StageFailed
    from pipeline.variants import base_model_path, verified_adapter
    names = ctx.registry.variants
    if name not in names:
        raise ChatError(f"{name!r} is not a variant (VARIANT, --variant): use one of {', '.join(names)}", 2)
    try:
        plan = ctx.plan
    except StageFailed as exc:
        raise ChatError(str(exc)) from None
    if not plan.get("feasible"):
        raise ChatError(f"the hardware plan says this machine cannot run the {ctx.cfg.tier} tier "
                        f"({plan.get('feasible_reason', 'not feasible')}): there is no model to talk to here")
    if name == "base":
        if merged:
            raise ChatError("MERGED=true: the base variant has no merged folder (it has no adapter to merge)", 2)
        base = base_model_path(ctx)
        if not Path(base).is_dir() and models.hub_revision(base) is None:
            raise ChatError(f"the base model {base} is not in the Hugging Face cache (HF_HOME): `make gpu-run` "
                            "downloads it before training")
        return {"kind": "base", "path": base, "note": models.display_name(ctx.cfg.tier, base)}
    metrics = ctx.evidence(name)
    rel = ctx.registry[name].evidence(ctx.cfg)
    if not isinstance(metrics, dict):
        raise ChatError(f"variant {name} has not been trained yet (no {rel}): `make gpu-run` trains it "
                        f"(or `python -m pipeline run {name}`)")
    if metrics.get("status") != "ok":
        raise ChatError(f"variant {name} has not been trained: its stage is {metrics.get('status')!r} in {rel} "
                        f"({metrics.get('reason')}): `make gpu-run` trains it (or `python -m pipeline run {name}`)")
    try:
        adapter = verified_adapter(ctx, name)   # eval's check: the final re-hashes to its metrics, else refused
    except StageFailed as exc:
        raise ChatError(str(exc)) from None
    final = adapter.relative_to(ctx.root).as_posix()
    if merged is False:
        return {"kind": "adapter", "path": adapter, "note": f"adapter {final}, verified (MERGED=false)"}
    folder, why = merged_folder(ctx, name, metrics)
    if folder is None and merged:
        raise ChatError(f"MERGED=true: variant {name} has no merged folder to use: {why}")
    if folder is None:
        return {"kind": "adapter", "path": adapter,
                "note": f"adapter {final}, verified (merged folder not used: {why})"}
    return {"kind": "merged", "path": folder,
            "note": f"merged folder {folder.relative_to(ctx.root).as_posix()}, verified (parity passed)"}


def load(vs, ctx, name: str, src: dict):
    """(model, tokenizer) on `vs` (variants.Variants: one model alive, the plan's device and dtype): an adapter goes
    onto the base as eval puts it, a merged folder loads as plain weights (its plan has no quantization)."""
    from pipeline.variants import base_model_path
    if src["kind"] == "adapter":
        return vs.load(base_model_path(ctx), src["path"], name)
    return vs.load(src["path"])


def trim(tok, head: list[dict], history: list[dict], question: dict, limit: int | None, room: int) -> list[dict]:
    """The history without its oldest turns while the prompt (system, history, question) and `room` new tokens
    exceed `limit`, the model's context; the system prompt and the question always stay."""
    def size(turns):
        text = tok.apply_chat_template(head + turns + [question], tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    while limit and history and size(history) + room > limit:
        history = history[2:]
    return history


def console_streamer(tok, console):
    """transformers' TextStreamer, printing the visible text of each new token through the rich console."""
    from transformers import TextStreamer

    class ConsoleStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            console.print(text, end="\n" if stream_end else "", markup=False, highlight=False, soft_wrap=True)
    return ConsoleStreamer(tok, skip_prompt=True, skip_special_tokens=True)


def answer(model, tok, messages: list[dict], max_new_tokens: int, streamer=None) -> str:
    """Eval's greedy answer to one chat prompt (variants.generate: same template, decoding and eos ids)."""
    from pipeline.variants import generate
    return generate(model, tok, [messages], 1, max_new_tokens, streamer=streamer)[0]


def converse(model, tok, label: str, args, out) -> int:
    """The terminal chat: one question per line, the answer streamed, the history kept until /reset or /exit."""
    head = [{"role": "system", "content": args.system}] if args.system else []
    limit = getattr(model.config, "max_position_embeddings", None)
    history: list[dict] = []
    while True:
        try:
            line = out.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            out.print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            out.print("[dim](history cleared)[/]")
            continue
        if line.startswith("/"):
            out.print(f"[dim]{HELP}[/]")
        if not line or line.startswith("/"):
            continue
        question = {"role": "user", "content": line}
        kept = trim(tok, head, history, question, limit, args.max_new_tokens)
        if len(kept) < len(history):
            out.print(f"[dim](the {(len(history) - len(kept)) // 2} oldest turn(s) no longer fit the model's "
                      "context: dropped)[/]")
        history = kept
        out.print(f"[bold green]{label}>[/] ", end="")
        try:
            reply = answer(model, tok, head + history + [question], args.max_new_tokens, console_streamer(tok, out))
        except KeyboardInterrupt:
            out.print("\n[dim](interrupted: this question is not kept)[/]")
            continue
        history += [question, {"role": "assistant", "content": reply}]


def cli(argv: list[str]) -> int:
    from rich.console import Console

    from pipeline import engine, settings
    from pipeline.stages import REGISTRY
    from pipeline.variants import Variants
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        args = options(argv)
        if not args.variant:
            raise ChatError(f"name a variant: make chat VARIANT=<{'|'.join(REGISTRY.variants)}> "
                            "(or python -m pipeline chat --variant NAME)", 2)
        try:
            cfg = settings.load_config(overrides=args.overrides)
        except settings.ConfigError as exc:
            raise ChatError(f"config error: {exc}", 2) from None
        settings.pin_visible_devices(cfg)   # before torch starts CUDA
        # chat reads what export_merged reads: every variant's metrics, the plan, the merged folders' parity check
        ctx = engine.make_ctx(REGISTRY["export_merged"], cfg, err, REGISTRY)
        src = source(ctx, args.variant, args.merged)
    except ChatError as exc:
        print(f"chat: {exc}", file=sys.stderr)
        return exc.code
    err.print(f"[dim]chat: {args.variant}: {src['note']}; {ctx.plan.get('device')} "
              f"{ctx.plan.get('precision')}, greedy, at most {args.max_new_tokens} new tokens[/]")
    with Variants(ctx, {**ctx.plan, "quantization": None} if src["kind"] == "merged" else ctx.plan) as vs:
        model, tok = load(vs, ctx, args.variant, src)
        if args.prompt is not None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            messages.append({"role": "user", "content": args.prompt})
            if sys.stdout.isatty():   # a person watches: stream it; a script gets exactly eval's answer
                answer(model, tok, messages, args.max_new_tokens, console_streamer(tok, Console(highlight=False)))
            else:
                print(answer(model, tok, messages, args.max_new_tokens), flush=True)
            return 0
        out = Console(highlight=False)
        out.print(f"[bold]chat with {args.variant}[/] ({HELP})")
        return converse(model, tok, args.variant, args, out)

"""CLI.  python -m pipeline run <stage>|all [key=value ...] [--force] | ls | check | config | prune | chat ... | day1 ..."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="MedLLM Day-1 pipeline")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run a stage (and what it needs) or 'all'; finished stages are skipped")
    p_run.add_argument("targets", nargs="*", help="stage names or 'all', then optional key=value overrides")
    p_run.add_argument("--force", action="store_true", help="re-run the named stages even when up to date")
    p_run.add_argument("--no-deps", action="store_true", help="run only the named stages; their needs must be done")
    for name, text in (("ls", "stages in order with their status"), ("check", "the strict completion gate"),
                       ("config", "print the resolved config"),
                       ("prune", "delete checkpoint folders kept aside for other configs; says what it frees")):
        p = sub.add_parser(name, help=text)
        p.add_argument("targets", nargs="*", help="key=value overrides")
    sub.add_parser("day1", help="day1_run.sh's helpers: keys, root, flag NAME, summary STEPS.jsonl (see -h)",
                   add_help=False)
    sub.add_parser("chat", help="talk to base or a trained variant: chat --variant sft [--prompt TEXT] (see -h)",
                   add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:   # forwarded as is: a prompt may hold "=" (never a config override)
        from pipeline import chat
        return chat.cli(argv[1:])
    if argv[:1] == ["day1"]:   # forwarded as is: the helpers parse their own arguments (and need no config)
        from pipeline import day1
        return day1.cli(argv[1:])
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    if args.cmd == "run" and not args.targets:
        parser.error("run: name a stage or 'all'")

    from rich.console import Console
    from pipeline.settings import ConfigError, load_config, pin_visible_devices
    console = Console(highlight=False)
    try:
        cfg = load_config(overrides=overrides)
    except ConfigError as exc:
        console.print(f"[red]config error:[/] {exc}", soft_wrap=True)
        return 2
    pin_visible_devices(cfg)   # before anything imports torch and CUDA starts
    from pipeline import engine
    from pipeline.stages import REGISTRY
    if args.cmd == "run":
        return engine.run(args.targets, cfg, console, REGISTRY, force=args.force, with_needs=not args.no_deps)
    if args.cmd == "ls":
        engine.print_table(cfg, console, REGISTRY)
        return 0
    if args.cmd == "config":
        print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0
    if args.cmd == "prune":
        from pathlib import Path

        from pipeline.training_record import prune
        with engine.pipeline_lock(Path(cfg.root), console):   # never while a run uses them
            freed = prune(Path(cfg.root))
        for rel, size in freed:
            console.print(f"deleted {rel} ({size / 2**20:.1f} MiB)")
        console.print(f"pruned {len(freed)} folder(s), freed {sum(s for _, s in freed) / 2**20:.1f} MiB"
                      if freed else "nothing to prune: no checkpoint folder is kept aside for another config")
        return 0
    from pipeline import gate
    return gate.main(cfg, console)


if __name__ == "__main__":
    sys.exit(main())

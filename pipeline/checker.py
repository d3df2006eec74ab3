"""Compatibility shim: the gate moved to pipeline.gate (+ pipeline.training_checks, pipeline.readiness), the
Day-1 helpers to pipeline.day1 (`python -m pipeline day1 ...`). `python -m pipeline.checker <cmd>` still works."""
import sys

from pipeline.day1 import SUMMARY, cli, day1_summary, key_report, read_steps, summary_markdown
from pipeline.gate import ADVICE, GATE, advice, check_stage, evaluate, main, probe_plan
from pipeline.readiness import ARTIFACTS, READINESS, gate_markdown, readiness_markdown, thesis_readiness
from pipeline.training_checks import CPU_PLAN, PROBE_PROMPT, PROBE_TOKENS, probe_checkpoint

__all__ = ["SUMMARY", "cli", "day1_summary", "key_report", "read_steps", "summary_markdown", "ADVICE", "GATE",
           "advice", "check_stage", "evaluate", "main", "probe_plan", "ARTIFACTS", "READINESS",
           "gate_markdown", "readiness_markdown", "thesis_readiness", "CPU_PLAN", "PROBE_PROMPT",
           "PROBE_TOKENS", "probe_checkpoint"]

if __name__ == "__main__":
    sys.exit(cli())

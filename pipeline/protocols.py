"""The scoring protocols, in one table: the eval evidence key holding each one's results (None: this pipeline does
not run it) and what it is, in the reports' words. pipeline/anchors.py pairs published figures by protocol and names
it in sota_compare.md; pipeline/eval_report.py and reporting.py label eval_default.md's tables with it.
"""
from __future__ import annotations

PROTOCOLS = {
    "generative_letter": ("results", "greedy generation, \"answer with the letter\" (or yes/no/maybe), rule "
                                     "extraction"),
    "loglik": ("results_loglik", "lm-evaluation-harness log-likelihood multiple choice: lm-eval's own medqa_4options "
                                 "/ pubmedqa / cmmlu_<subject> prompts over the bundled files, zero-shot, no chat "
                                 "template, acc (argmax of the options' log-likelihoods)"),
    "free_answer_extraction": ("results_free", "zero-shot free answer, the answer read from its conclusion by the "
                                               "set's rules"),
    "cot": (None, "chain-of-thought prompting"),
}
RESULTS = {name: key for name, (key, _) in PROTOCOLS.items()}   # protocol -> results key (None: not ours to run)
TEXT = {name: text for name, (_, text) in PROTOCOLS.items()}    # protocol -> what it is

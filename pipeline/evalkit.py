"""Evaluation toolkit: answer extraction rules, bootstrap confidence intervals, McNemar with Holm's correction,
the minimum detectable difference, answer distributions (degenerate predictors), lengths.

Extraction never guesses: an output that asserts two different answers, says "A or B", or matches
no rule gives `(None, method)`, and the caller counts it as unanswered.
Methods are named so an error analysis can group by them:
  choice: rule:only_letter, rule:answer_is, rule:zh_daan, rule:zh_xuan, rule:zh_correct,
          rule:leading_letter, rule:option_text; failures: ambiguous:or, ambiguous:conflict,
          ambiguous:leading_labels, ambiguous:option_text, no_match
  yes/no/maybe: rule:only_word, rule:answer_is, rule:zh_daan, rule:leading_word, rule:zh_leading;
          failures: ambiguous:or, ambiguous:conflict, no_match
  free answers (extract_conclusion): conclusion:<one of the above> or whole:<one of the above>
"""
from __future__ import annotations

import re
import statistics
import unicodedata
from collections import Counter
from functools import lru_cache

__all__ = ["extract_choice", "extract_yes_no_maybe", "extract_conclusion", "accuracy_ci", "diff_ci", "mcnemar_exact",
           "holm_by_protocol", "min_detectable_difference", "answer_distribution", "length_stats"]
ALPHA, POWER = 0.05, 0.8     # two-sided significance level and power of every statement the reports make
MDD_METHOD = ("normal approximation for two proportions at p = 0.5 (the largest variance), unpaired: "
              "(z_{1-alpha/2} + z_{power}) * sqrt(2 p (1 - p) / n); conservative for the paired McNemar test "
              "whenever the two systems disagree on at most half the questions")


def _normalize(text: str) -> str:
    """Full-width to ASCII (NFKC: 'Ａ' -> 'A', '：' -> ':'), markdown emphasis and code marks removed."""
    text = unicodedata.normalize("NFKC", text or "")
    return re.sub(r"[*`_#]+", "", text).strip()


# ---------------------------------------------------------------- multiple choice
@lru_cache(maxsize=16)
def _choice_rules(letters: str):
    L = f"[{re.escape(letters)}]"
    tok = rf"\(?({L})\)?(?![A-Za-z0-9])"  # one option letter, optionally in parentheses
    asserts = [
        ("rule:answer_is", rf"(?i:answer)\s*(?i:is|would be|should be|will be)?\s*[:=\-]?\s*(?i:option\s*)?{tok}"),
        ("rule:answer_is", rf"\b(?i:i(?: would)? (?:choose|select|pick|go with))\s*(?i:option\s*)?{tok}"),
        ("rule:answer_is", rf"\b(?i:option|choice)\s*{tok}\s*(?i:is|would be)\s*(?i:the\s*)?(?i:correct|right|best|most likely)"),
        ("rule:answer_is", rf"(?<![A-Za-z0-9])\(?({L})\)?\s*(?i:is)\s*(?i:the\s*)?(?i:correct|right|best)\s*(?i:answer|option|choice)"),
        ("rule:zh_daan", rf"答案\s*(?:应该|应|就)?\s*(?:是|为|选)?\s*:?\s*(?:选项)?\s*{tok}"),
        ("rule:zh_xuan", rf"(?:选择|选)\s*(?:选项)?\s*{tok}"),
        ("rule:zh_correct", rf"(?<![A-Za-z0-9])(?:选项)?\s*\(?({L})\)?\s*(?:项)?\s*(?:是|为)?\s*(?:正确|最佳|最合适|最恰当)"),
    ]
    return {
        "only": re.compile(rf"^\W*({L})\W*$"),
        "or": re.compile(rf"(?<![A-Za-z0-9])\(?({L})\)?\s*(?:\bor\b|/|或者|或|还是)\s*\(?({L})\)?(?![A-Za-z0-9])"),
        "asserts": [(name, re.compile(p)) for name, p in asserts],
        "leading": re.compile(rf"^\(?({L})(?:\)|[.:、,，]|\s+-\s|\s*$)", re.M),
    }


def extract_choice(text: str, letters: str = "ABCD", options: dict | None = None) -> tuple[str | None, str]:
    """The option letter a model's output commits to, and the rule that found it; (None, why) otherwise.

    `options` ({letter: option text}) enables the last rule: exactly one option's text appears.
    """
    rules = _choice_rules(letters)
    t = _normalize(text)
    if m := rules["only"].match(t):
        return m.group(1), "rule:only_letter"
    if any(a != b for a, b in rules["or"].findall(t)):
        return None, "ambiguous:or"
    found = [(m.group(1), name) for name, rx in rules["asserts"] for m in rx.finditer(t)]
    if len({letter for letter, _ in found}) > 1:
        return None, "ambiguous:conflict"
    if found:
        return found[0]
    labels = rules["leading"].findall(t)
    if len(set(labels)) > 1:
        return None, "ambiguous:leading_labels"
    if labels and t.startswith((labels[0], "(" + labels[0])):
        return labels[0], "rule:leading_letter"
    if options:
        return _match_option_text(t, options)
    return None, "no_match"


def _match_option_text(t: str, options: dict) -> tuple[str | None, str]:
    """Exactly one option's text appears (a shorter option text inside a longer matched one does not count)."""
    norm = lambda s: " ".join(str(s).casefold().split())  # noqa: E731
    t = norm(t)
    texts = {letter: norm(o) for letter, o in options.items() if norm(o)}
    hits = [letter for letter, o in texts.items() if o in t]
    kept = []
    for letter in hits:
        rest = t
        for other in hits:
            if other != letter and texts[letter] in texts[other]:
                rest = rest.replace(texts[other], " ")
        if texts[letter] in rest:
            kept.append(letter)
    if len(kept) == 1:
        return kept[0], "rule:option_text"
    return None, "ambiguous:option_text" if kept else "no_match"


# ---------------------------------------------------------------- yes / no / maybe
_YNM = r"(yes|no|maybe)"
_ZH_WORDS = {"是的": "yes", "是": "yes", "对": "yes", "不是": "no", "否": "no", "不": "no",
             "可能": "maybe", "不确定": "maybe", "也许": "maybe"}
_ZH = r"(不确定|不是|是的|可能|也许|(?:是|否|对|不)(?=\W|$))"  # bare 是/否/对/不 only before punctuation
_YNM_RULES = {
    "only": re.compile(rf"^\W*{_YNM}\W*$"),
    "or": re.compile(r"\b(yes|no|maybe)\s*(?:\bor\b|/)\s*(yes|no|maybe)\b|(是|否|可能)\s*(?:或者|或|还是|/)\s*(是|否|可能)"),
    "asserts": [
        ("rule:answer_is", re.compile(rf"answer\s*(?:is|would be|should be)?\s*[:=\-]?\s*\(?{_YNM}\b")),
        ("rule:zh_daan", re.compile(rf"答案\s*(?:应该|应)?\s*(?:是|为)?\s*:?\s*(?:{_YNM}\b|{_ZH})")),
    ],
    "leading": re.compile(rf"^\W*{_YNM}\b"),
    "zh_leading": re.compile(rf"^\W*{_ZH}"),
}


def extract_yes_no_maybe(text: str) -> tuple[str | None, str]:
    """'yes' | 'no' | 'maybe' that an output (English or Chinese) commits to, and the rule; (None, why) otherwise."""
    t = _normalize(text).casefold()
    if m := _YNM_RULES["only"].match(t):
        return m.group(1), "rule:only_word"
    for m in _YNM_RULES["or"].finditer(t):
        a, b = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if a != b:
            return None, "ambiguous:or"
    found = []
    for name, rx in _YNM_RULES["asserts"]:
        for m in rx.finditer(t):
            word = next(g for g in m.groups() if g)
            found.append((_ZH_WORDS.get(word, word), name))
    if len({label for label, _ in found}) > 1:
        return None, "ambiguous:conflict"
    if found:
        return found[0]
    if m := _YNM_RULES["leading"].match(t):
        return m.group(1), "rule:leading_word"
    if m := _YNM_RULES["zh_leading"].match(t):
        return _ZH_WORDS[m.group(1)], "rule:zh_leading"
    return None, "no_match"


# ---------------------------------------------------------------- free answers (protocol free_answer_extraction)
_CUES = re.compile(r"(?i:final response|final answer|the answer is|correct answer is|answer\s*:)|答案|最终回答")


def extract_conclusion(text: str, extract) -> tuple[str | None, str]:
    """The answer a free (possibly long) output concludes with: `extract` (the set's own rules) on the text from
    its last answer cue ('The answer is', 'Final answer', 'Answer:', '答案', HuatuoGPT-o1's '## Final Response')
    on; where there is no cue, or the rules find nothing after it, the rules on the whole output. The method says
    which: 'conclusion:<rule>' or 'whole:<rule>'. Never guesses: a whole output that names several answers is
    ambiguous, as in extract_choice."""
    cues = list(_CUES.finditer(text or ""))
    if cues:
        answer, method = extract(text[cues[-1].start():])
        if answer is not None:
            return answer, f"conclusion:{method}"
    answer, method = extract(text or "")
    return answer, f"whole:{method}"


# ---------------------------------------------------------------- statistics
def _bootstrap_mean(x, out: dict, seed: int, n_resamples: int, confidence: float) -> dict:
    """`out` with the percentile-bootstrap interval of the mean of x (scipy.stats.bootstrap, seeded)."""
    import numpy as np
    from scipy.stats import bootstrap

    if np.all(x == x[0]):
        point = float(x.mean())
        return out | {"ci_low": point, "ci_high": point,
                      "note": "degenerate: every outcome is the same, so the bootstrap interval is the point"}
    res = bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                    method="percentile", rng=np.random.default_rng(seed))
    return out | {"ci_low": float(res.confidence_interval.low), "ci_high": float(res.confidence_interval.high)}


def accuracy_ci(correct: list[bool], seed: int = 0, n_resamples: int = 2000, confidence: float = 0.95) -> dict:
    """Accuracy with a percentile-bootstrap confidence interval (scipy.stats.bootstrap, seeded)."""
    import numpy as np

    x = np.asarray(correct, dtype=float)
    out = {"n": int(x.size), "correct": int(x.sum()), "accuracy": None, "ci_low": None, "ci_high": None,
           "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
           "method": "percentile bootstrap (scipy.stats.bootstrap)"}
    if x.size == 0:
        return out | {"note": "no questions: accuracy and interval are undefined"}
    return _bootstrap_mean(x, out | {"accuracy": float(x.mean())}, seed, n_resamples, confidence)


def _same_questions(name: str, a: list, b: list) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name}: a has {len(a)} outcomes and b has {len(b)}; "
                         "pass both systems' results on the same questions in the same order")


def diff_ci(a: list[bool], b: list[bool], seed: int = 0, n_resamples: int = 2000, confidence: float = 0.95) -> dict:
    """accuracy(a) - accuracy(b) with a paired percentile-bootstrap interval: questions are resampled with both
    systems' outcomes together, i.e. the bootstrap of the mean per-question difference (1, 0 or -1)."""
    import numpy as np

    _same_questions("diff_ci", a, b)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = {"n": int(d.size), "difference": None, "ci_low": None, "ci_high": None, "confidence": confidence,
           "n_resamples": n_resamples, "seed": seed,
           "method": "paired percentile bootstrap over questions (scipy.stats.bootstrap)"}
    if d.size == 0:
        return out | {"note": "no questions: the difference and its interval are undefined"}
    return _bootstrap_mean(d, out | {"difference": float(d.mean())}, seed, n_resamples, confidence)


def mcnemar_exact(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test for two systems scored on the same questions (paired by position)."""
    from scipy.stats import binomtest

    _same_questions("mcnemar_exact", a, b)
    pairs = list(zip(map(bool, a), map(bool, b)))
    a_only = sum(x and not y for x, y in pairs)
    b_only = sum(y and not x for x, y in pairs)
    discordant = a_only + b_only
    p = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return {"n": len(pairs), "a_only": a_only, "b_only": b_only,
            "both": sum(x and y for x, y in pairs), "neither": sum(not x and not y for x, y in pairs),
            "p_value": float(p), "method": "McNemar exact (scipy.stats.binomtest on discordant pairs)"}


def holm_by_protocol(tests: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Adds `p_holm` (Holm-Bonferroni, statsmodels multipletests) and `survives_holm` (rejected at alpha) to
    each test, the family being the tests of one `protocol`; returns the same list."""
    from statsmodels.stats.multitest import multipletests

    for protocol in dict.fromkeys(t["protocol"] for t in tests):
        family = [t for t in tests if t["protocol"] == protocol]
        reject, adjusted, _, _ = multipletests([t["p_value"] for t in family], alpha=alpha, method="holm")
        for t, r, p in zip(family, reject, adjusted):
            t.update(p_holm=float(p), survives_holm=bool(r))
    return tests


def min_detectable_difference(n: int, alpha: float = ALPHA, power: float = POWER, p: float = 0.5) -> float | None:
    """The smallest accuracy difference (a fraction) a two-sided test at `alpha` finds with `power` on n questions
    per system; the formula is MDD_METHOD. None without questions."""
    from scipy.stats import norm

    if n <= 0:
        return None
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * (2 * p * (1 - p) / n) ** 0.5)


def answer_distribution(predicted: list[str | None], gold: list[str], share: float = 0.6) -> dict:
    """Extracted answers against the gold answers of the same questions, and the degenerate-predictor flag: one
    answer takes more than `share` of the questions while the gold's largest share is below `share`.
    Shares are of all questions; an unanswered question (None) counts in n, never as an answer."""
    n, pred, gold_counts = len(gold), Counter(p for p in predicted if p is not None), Counter(gold)
    top, top_n = pred.most_common(1)[0] if pred else (None, 0)
    top_share = top_n / n if n else None
    gold_share = max(gold_counts.values()) / n if n else None
    return {"predicted": dict(sorted(pred.items())), "unanswered": len(predicted) - sum(pred.values()),
            "gold": dict(sorted(gold_counts.items())), "top_answer": top, "top_share": top_share,
            "gold_top_share": gold_share, "threshold": share,
            "degenerate": bool(n and top_share > share and gold_share < share)}


def length_stats(texts: list[str]) -> dict:
    """Length in characters: n, mean, median, p90 (nearest-rank), max; None values when empty."""
    lengths = sorted(len(t or "") for t in texts)
    if not lengths:
        return {"n": 0, "mean": None, "median": None, "p90": None, "max": None}
    p90 = lengths[max(0, -(-9 * len(lengths) // 10) - 1)]  # nearest rank: ceil(0.9 n)-th value
    return {"n": len(lengths), "mean": statistics.fmean(lengths), "median": statistics.median(lengths),
            "p90": p90, "max": lengths[-1]}

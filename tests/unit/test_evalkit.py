"""Answer extraction, bootstrap CI, McNemar and length statistics (pipeline/evalkit.py)."""
import pytest

from pipeline.evalkit import accuracy_ci, extract_choice, extract_yes_no_maybe, length_stats, mcnemar_exact

CHOICE_CASES = [
    # (model output, expected letter or None)
    ("The answer is (B)", "B"),
    ("Answer: C", "C"),
    ("B. Hypertension", "B"),
    ("**D**", "D"),
    ("(A)", "A"),
    ("C", "C"),
    ("B.", "B"),
    ("Ｂ", "B"),  # full-width
    ("（C）", "C"),
    ("The correct answer is C. Option A is incorrect because it ignores renal function.", "C"),
    ("Let's analyze each option.\nA. Asthma: unlikely without wheeze.\nB. COPD: fits the smoking history.\n"
     "Therefore, the answer is B.", "B"),
    ("Option D is correct, since metformin is first-line.", "D"),
    ("I would choose A because the patient is hemodynamically unstable.", "A"),
    ("Final answer: **A**", "A"),
    ("D) Administer intravenous epinephrine", "D"),
    ("Answer: B. The answer is not A.", "B"),
    ("选C", "C"),
    ("答案：B", "B"),
    ("答案是 D", "D"),
    ("正确答案为A", "A"),
    ("我选择B", "B"),
    ("答案应该是C，因为A和B都与题干不符。", "C"),
    ("C是正确的。", "C"),
    ("选项A错误，选项D正确。", "D"),
    ("根据题干，选择 B 项。", "B"),
    ("答案：Ｄ", "D"),
    ("B、高血压", "B"),
    # ambiguous or no commitment -> None, never a guess
    ("The answer is A or B", None),
    ("It is either A/B, depending on the lab results.", None),
    ("答案：A或B", None),
    ("The answer is B, but C is also possible; final answer: C", None),
    ("A. Asthma\nB. COPD", None),
    ("A 45-year-old man presents with crushing chest pain; this is likely a myocardial infarction.", None),
    ("I am not sure.", None),
    ("", None),
    ("这道题我不确定。", None),
]


@pytest.mark.parametrize("text,expected", CHOICE_CASES)
def test_extract_choice_table(text, expected):
    letter, method = extract_choice(text)
    assert letter == expected, f"{text!r} -> {letter} via {method}"
    assert method.startswith("rule:") == (expected is not None)


def test_extract_choice_honours_letters():
    assert extract_choice("The answer is E")[0] is None
    assert extract_choice("The answer is E", letters="ABCDE") == ("E", "rule:answer_is")


def test_extract_choice_option_text_needs_exactly_one_option():
    options = {"A": "Hypertension", "B": "Pulmonary hypertension", "C": "Asthma"}
    assert extract_choice("This is most consistent with pulmonary hypertension.", options=options) == \
        ("B", "rule:option_text")
    assert extract_choice("Asthma.", options=options) == ("C", "rule:option_text")
    assert extract_choice("Hypertension or asthma could explain it.", options=options)[0] is None
    assert extract_choice("This is most consistent with pulmonary hypertension.")[0] is None  # no options given


YNM_CASES = [
    ("yes", "yes"), ("No.", "no"), ("Maybe", "maybe"), ("**Yes**", "yes"),
    ("Yes, the trial shows a significant reduction in mortality.", "yes"),
    ("No significant difference was found, so the answer is yes.", "yes"),
    ("The answer is maybe.", "maybe"), ("Final answer: No", "no"),
    ("是的", "yes"), ("是。", "yes"), ("不是", "no"), ("否", "no"), ("可能", "maybe"), ("不确定", "maybe"),
    ("答案：否", "no"), ("答案是可能", "maybe"), ("答案是 yes", "yes"), ("也许吧", "maybe"),
    ("yes or no", None), ("Yes/No", None), ("The answer is yes. Actually the answer is no.", None),
    ("是由于病毒感染", None), ("Based on the results, it is unclear.", None), ("", None),
]


@pytest.mark.parametrize("text,expected", YNM_CASES)
def test_extract_yes_no_maybe_table(text, expected):
    label, method = extract_yes_no_maybe(text)
    assert label == expected, f"{text!r} -> {label} via {method}"


def test_accuracy_ci_contains_accuracy_and_shrinks_with_n():
    small = accuracy_ci([True, True, True, False] * 5)
    large = accuracy_ci([True, True, True, False] * 100)
    for r in (small, large):
        assert r["accuracy"] == 0.75
        assert r["ci_low"] < 0.75 < r["ci_high"]
        assert r["method"] == "percentile bootstrap (scipy.stats.bootstrap)"
    assert large["ci_high"] - large["ci_low"] < (small["ci_high"] - small["ci_low"]) / 2
    assert accuracy_ci([True, False] * 10, seed=3) == accuracy_ci([True, False] * 10, seed=3)


def test_accuracy_ci_degenerate_and_empty():
    all_right = accuracy_ci([True] * 7)
    assert (all_right["accuracy"], all_right["ci_low"], all_right["ci_high"]) == (1.0, 1.0, 1.0)
    assert "degenerate" in all_right["note"]
    empty = accuracy_ci([])
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["ci_low"] is None and "note" in empty


def test_mcnemar_exact_matches_hand_computation():
    # 1 question only A gets right, 6 only B, 2 both, 1 neither.
    # Exact two-sided p = 2 * P(X <= 1 | n=7, p=1/2) = 2 * (1 + 7) / 128 = 0.125
    a = [True] + [False] * 6 + [True, True] + [False]
    b = [False] + [True] * 6 + [True, True] + [False]
    r = mcnemar_exact(a, b)
    assert (r["n"], r["a_only"], r["b_only"], r["both"], r["neither"]) == (10, 1, 6, 2, 1)
    assert r["p_value"] == pytest.approx(0.125)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same questions"):
        mcnemar_exact([True], [True, False])


def test_length_stats():
    r = length_stats(["a" * n for n in range(1, 11)])
    assert r == {"n": 10, "mean": 5.5, "median": 5.5, "p90": 9, "max": 10}
    assert length_stats([])["mean"] is None

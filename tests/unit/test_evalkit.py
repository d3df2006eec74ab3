"""Answer extraction, bootstrap CI, McNemar and length statistics (pipeline/evalkit.py)."""
import pytest

from pipeline.evalkit import (accuracy_ci, answer_distribution, diff_ci, extract_choice, extract_yes_no_maybe,
                             holm_by_protocol, length_stats, mcnemar_exact, min_detectable_difference)

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


# ------------------------------------------------ issue 12: corrected tests, power, degenerate predictors
def test_holm_matches_a_hand_computed_family():
    # sorted p 0.005, 0.01, 0.03, 0.04 (m=4): x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
    # 0.02, 0.03, 0.06, 0.06; in input order 0.03, 0.06, 0.06, 0.02; only 0.01 and 0.005 survive at 0.05
    tests = [{"protocol": "generative_letter", "p_value": p} for p in (0.01, 0.04, 0.03, 0.005)]
    holm_by_protocol(tests)
    assert [t["p_holm"] for t in tests] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [t["survives_holm"] for t in tests] == [True, False, False, True]
    assert all(t["p_holm"] >= t["p_value"] for t in tests)


def test_holm_families_are_per_protocol():
    """Two protocols: each is its own family (pooled, 0.02 would be x3 = 0.06 and fail)."""
    tests = [{"protocol": "generative_letter", "p_value": 0.02}, {"protocol": "loglik", "p_value": 0.02},
             {"protocol": "loglik", "p_value": 0.03}]
    holm_by_protocol(tests)
    assert [t["p_holm"] for t in tests] == pytest.approx([0.02, 0.04, 0.04])
    assert all(t["survives_holm"] for t in tests)
    assert holm_by_protocol([]) == []


def test_diff_ci_is_paired_and_seeded():
    """b = a with 10 of 200 right answers lost: a 5-point difference that a paired bootstrap resolves
    (two unpaired accuracy CIs at n=200 are each about 13 points wide and overlap)."""
    import random
    rng = random.Random(0)
    a = [rng.random() < 0.6 for _ in range(200)]
    right = [i for i, x in enumerate(a) if x][:10]
    b = [x and i not in right for i, x in enumerate(a)]
    r = diff_ci(a, b, seed=3, n_resamples=1000)
    assert r["difference"] == pytest.approx(0.05)
    assert 0 < r["ci_low"] < 0.05 < r["ci_high"] < 0.1
    assert (r["n"], r["n_resamples"], r["seed"], r["confidence"]) == (200, 1000, 3, 0.95)
    ca, cb = accuracy_ci(a, seed=3, n_resamples=1000), accuracy_ci(b, seed=3, n_resamples=1000)
    assert cb["ci_high"] > ca["ci_low"]                    # unpaired intervals overlap
    assert diff_ci(a, b, seed=3, n_resamples=1000) == r
    same = diff_ci(a, a)
    assert (same["difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0) and "degenerate" in same["note"]
    with pytest.raises(ValueError, match="same questions"):
        diff_ci([True], [True, False])


def test_minimum_detectable_difference_by_hand():
    # (z_0.975 + z_0.8) * sqrt(2 * 0.5 * 0.5 / n) = 2.801585 * sqrt(0.5 / n)
    assert min_detectable_difference(8) == pytest.approx(2.801585 * 0.25, abs=1e-6)
    assert min_detectable_difference(1273) == pytest.approx(0.05553, abs=1e-5)
    assert min_detectable_difference(200, power=0.9) > min_detectable_difference(200)
    assert min_detectable_difference(0) is None


def test_degenerate_predictor_flag():
    gold = list("AAABBCCD")                               # the gold's largest share: 3/8
    smol = answer_distribution(list("AAAAAAAB"), gold)      # the SmolLM2 base on MedQA: 'A' 7 of 8
    assert smol["predicted"] == {"A": 7, "B": 1} and smol["gold"] == {"A": 3, "B": 2, "C": 2, "D": 1}
    assert (smol["top_answer"], smol["top_share"], smol["gold_top_share"]) == ("A", 0.875, 0.375)
    assert smol["degenerate"] is True and smol["threshold"] == 0.6
    assert answer_distribution(list("AAAAAAAB"), gold, share=0.9)["degenerate"] is False
    assert answer_distribution(list("ABCDABCD"), gold)["degenerate"] is False
    blank = answer_distribution([None] * 8, gold)          # unanswered is a format failure, not an answer
    assert blank["unanswered"] == 8 and blank["top_answer"] is None and blank["degenerate"] is False
    yes_heavy = ["yes"] * 5 + ["no"] * 3                  # gold itself mostly 'yes': 'yes' 8 of 8 is not flagged
    assert answer_distribution(["yes"] * 8, yes_heavy)["degenerate"] is False
    assert answer_distribution([], [])["degenerate"] is False


def test_degenerate_share_is_validated(tmp_path):
    from pipeline.settings import ConfigError, load_config
    env = {"PIPELINE_ROOT": str(tmp_path)}
    assert load_config(tier="tiny", env=env).eval.degenerate_share == 0.6
    assert load_config(tier="tiny", env=env, overrides=["eval.degenerate_share=0.8"]).eval.degenerate_share == 0.8
    with pytest.raises(ConfigError, match="eval.degenerate_share"):
        load_config(tier="tiny", env=env, overrides=["eval.degenerate_share=1.5"])


def test_a_degenerate_trained_variant_blocks_writing(tmp_path):
    """Recomputed from the predictions, not read back from the flag in eval_default.json."""
    import json
    from pipeline import evidence as ev
    from pipeline.readiness import thesis_readiness
    from pipeline.settings import load_config
    cfg = load_config(tier="7b", env={"PIPELINE_ROOT": str(tmp_path)})
    gold = "AAABBCCD"

    def blockers(sft_answers, flag=None):
        for v, answers in (("base", "AAAAAAAB"), ("sft", sft_answers)):
            rows = [{"id": f"q{i}", "set": "medqa", "extracted": x, "gold": g}
                    for i, (x, g) in enumerate(zip(answers, gold))]
            (tmp_path / "reports/eval/predictions").mkdir(parents=True, exist_ok=True)
            (tmp_path / f"reports/eval/predictions/{v}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ev.atomic_write_json(tmp_path / "reports/eval/eval_default.json", {
            "status": "ok", "variants": {v: {"status": "scored"} for v in ("base", "sft")},
            "results": {"sft": {"medqa": {"answers": {"degenerate": flag}}}}})
        return [b for b in thesis_readiness(cfg, strict_pass=True)["blockers"] if "sft" in b]

    assert blockers("ABCDABCA") == []                      # the base's own 'A' habit is not the method's result
    [blocker] = blockers("BBBBBBBB", flag=False)             # a flag edited to false changes nothing
    assert "degenerate predictor on medqa" in blocker and "'B' to 100%" in blocker and "38%" in blocker
    (tmp_path / "reports/eval/predictions/sft.jsonl").unlink()
    ev.atomic_write_json(tmp_path / "reports/eval/eval_default.json",
                         {"status": "ok", "variants": {"sft": {"status": "scored"}}})
    [blocker] = [b for b in thesis_readiness(cfg, strict_pass=True)["blockers"] if "sft" in b]
    assert "predictions/sft.jsonl is missing" in blocker


# --- protocol free_answer_extraction: the same rules, read on the answer's conclusion ---------------------------
@pytest.mark.parametrize("text, want", [
    ("Option A fits the age, but B explains the labs. The answer is B.", ("B", "conclusion:rule:answer_is")),
    ("## Thinking\nA? No. C fits.\n## Final Response\nThe answer is C.", ("C", "conclusion:rule:answer_is")),
    ("这题考查……排除A、B。答案是D", ("D", "conclusion:rule:zh_daan")),
    ("D", ("D", "whole:rule:only_letter")),                                  # no cue: the rules on the whole text
    ("A or B, hard to say.", (None, "whole:ambiguous:or")),                 # never guesses
    ("The answer is unclear; A and C both fit.", (None, "whole:no_match")),
])
def test_a_free_answer_is_read_from_its_conclusion_by_the_sets_rules(text, want):
    from pipeline.evalkit import extract_conclusion
    assert extract_conclusion(text, lambda t: extract_choice(t, "ABCD")) == want


def test_a_free_yes_no_maybe_answer_takes_its_last_stated_answer():
    from pipeline.evalkit import extract_conclusion
    text = "At first glance yes, but the cohort was small. The answer is maybe."
    assert extract_conclusion(text, extract_yes_no_maybe) == ("maybe", "conclusion:rule:answer_is")


def test_the_free_prompts_ask_no_letter_only_answer():
    from pipeline import evalsets
    mc = {"set": "medqa", "id": "q1", "lang": "en", "question": "Q?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
          "answer": "A", "subject": "s"}
    text = evalsets.of(mc).free_prompt(mc)[0]["content"]
    assert "A. a" in text and "The answer is X" in text and "letter only" not in text
    assert "答案是X" in evalsets.SETS["cmmlu"].free_prompt(mc | {"set": "cmmlu", "lang": "zh"})[0]["content"]
    pq = {"set": "pubmedqa", "question": "Does it work?\n\nAbstract text.", "options": {}, "lang": "en"}
    text = evalsets.of(pq).free_prompt(pq)[0]["content"]
    assert "Context: Abstract text." in text and '"The answer is maybe"' in text

"""Reward functions: definitions on known cases, and a failing reward never crashes the step."""

import pytest

from megatron_rl.algo.registry import UnknownNameError
from megatron_rl.rewards import REWARDS, score
from megatron_rl.rewards.builtin import extract_answer, last_boxed


@pytest.mark.parametrize("response,label,want", [
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so x = \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("total: 1,234", "1234", 1.0),
    ("\\boxed{0.333}", "1/3", 0.0),              # outside the default tolerance
    ("\\boxed{x^{2}+1}", "x^{2} + 1", 1.0),      # non-numeric: normalised strings
    ("I think 41, no wait \\boxed{43}", "42", 0.0),
    ("no number here", "42", 0.0),
])
def test_math_reward_compares_the_final_answer(response, label, want):
    assert score("math", response, label).score == want


def test_math_tolerance_is_a_knob():
    assert score("math", "\\boxed{0.3333}", "1/3", rel_tol=1e-3).score == 1.0


def test_boxed_extraction_balances_nested_braces():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert extract_answer("values 3 and -2.5") == "-2.5"


def test_exact_match_and_format():
    assert score("exact_match", " 123 ", "123").score == 1.0
    assert score("exact_match", "Abc", "abc").score == 0.0
    assert score("exact_match", "Abc", "abc", ignore_case=True).score == 1.0
    assert score("format", "<think>hm</think> <answer>4</answer>", None).score == 1.0
    assert score("format", "<answer>4</answer>", None).score == 0.0


def test_a_reward_that_raises_is_recorded_not_raised():
    @REWARDS.register("test_broken_reward")
    def broken(response, label, *, prompt="", metadata=None):
        raise ZeroDivisionError("oops")

    try:
        r = score("test_broken_reward", "x", "y", failure_score=-1.0)
        assert r.score == -1.0 and r.error == "ZeroDivisionError: oops"
    finally:
        del REWARDS["test_broken_reward"]


def test_unknown_reward_and_unknown_knob_name_themselves():
    with pytest.raises(UnknownNameError, match="unknown reward function 'mathh'.*did you mean 'math'"):
        score("mathh", "1", "1")
    with pytest.raises(TypeError, match="rel_toll"):
        score("math", "1", "1", rel_toll=0.1)


def test_word_match_gives_partial_credit_over_the_longer_side():
    assert score("word_match", "4 1 3", "4 1 3").score == 1.0
    assert score("word_match", "4 1", "4 1 3").score == 2 / 3          # a missing word costs
    assert score("word_match", "4 1 3 3", "4 1 3").score == 3 / 4      # so does an extra one
    assert score("word_match", "1 4 3", "4 1 3").score == 1 / 3        # position by position
    assert score("word_match", "", "4").score == 0.0

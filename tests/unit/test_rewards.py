"""Reward functions: definitions on known cases, and a failing reward never crashes the step."""

import pathlib
import re
import textwrap

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


def test_a_reward_from_the_users_own_file_runs_like_a_built_in(tmp_path):
    from megatron_rl.config import ConfigError, load_config
    from megatron_rl.rewards import score

    recipe = pathlib.Path(__file__).resolve().parents[2] / "configs/recipes/tiny_moe_gspo.yaml"
    mine = tmp_path / "my_rewards.py"
    mine.write_text(textwrap.dedent("""
        def length_bonus(response, label, *, prompt="", metadata=None, scale=1.0):
            return scale * (response.strip() == str(label)) + 0.01 * len(response)

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            return {"score": float(solution_str == ground_truth) + (extra_info or {}).get("bonus", 0),
                    "acc": solution_str == ground_truth}

        def two_args(x):
            return 0.0
    """))
    cfg = load_config(recipe, [f"reward.name={mine}:length_bonus", "reward.params={scale: 2.0}"])
    assert score(cfg.reward.name, "3", "3", **cfg.reward.params).score == 2.0 + 0.01
    verl = load_config(recipe, [f"reward.name={mine}:compute_score"]).reward.name
    got = score(verl, "7", "7", metadata={"data_source": "gsm8k", "extra_info": {"bonus": 0.5}})
    assert got.score == 1.5 and got.error is None
    for name, needle in [(f"{mine}:nope", "has no function 'nope'; its functions: "
                                          "compute_score, length_bonus, two_args"),
                         (f"{mine}:two_args", "takes (x); a reward takes (response, label"),
                         (f"{tmp_path}/missing.py:f", "missing.py: no such file"),
                         ("no_such_pkg.mod:f", "no_such_pkg.mod: cannot import it")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(recipe, [f"reward.name={name}"])
    broken = tmp_path / "broken.py"
    broken.write_text("def f(response, label):\n    return 1\nraise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"broken.py: importing it failed \(RuntimeError: boom\)"):
        load_config(recipe, [f"reward.name={broken}:f"])


@pytest.mark.parametrize("response,label", [
    (r"so the answer is $\boxed{\dfrac{1}{2}}$", r"\frac{1}{2}"),
    (r"$\boxed{x=3}$", "3"),
    (r"The answer is $\boxed{10\%}$", "10"),
    (r"\boxed{\text{(B)}}", "B"),
    ("after simplifying, 0.5", r"\frac12"),
])
def test_math_verify_scores_equal_answers_as_equal_symbolically(response, label):
    assert score("math_verify", response, label).score == 1.0
    assert score("math_verify", response.replace("3", "4").replace("2", "5").replace("B", "C")
                 .replace("10", "11").replace("0.5", "0.6"), label).score == 0.0


def test_math_verify_scores_in_worker_threads_too():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda r: score("math_verify", r, "2").score, [r"\boxed{2}", "3"]))
    assert got == [1.0, 0.0]

"""Math answer extraction in the DAPO answer format (every benchmark's answers: tests/evaluation)."""

from __future__ import annotations

from flowrl_megatron.rewards.math import extract_answer, math_reward


def test_extraction_follows_the_prompt_format():
    assert extract_answer("x\nAnswer: $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("Answer: 3\nwait\nAnswer: 4") == "4"  # the last one counts
    assert extract_answer("the result is \\boxed{7}") == "7"
    assert extract_answer("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}}.") == "x^{2}"  # the last, braces balanced
    assert extract_answer("\\boxed{unclosed") is None
    assert extract_answer("the result is 7") is None


def test_equivalent_forms_and_missing_answers():
    assert math_reward("Answer: 0.5", "\\frac{1}{2}") == 1.0
    assert math_reward("so \\boxed{12}", "12") == 1.0
    assert math_reward("I think it is 12", "12") == 0.0  # no Answer: line and no box
    assert math_reward("Answer: 13", "12") == 0.0

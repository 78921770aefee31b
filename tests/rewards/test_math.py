"""Math grading with math-verify on the real benchmark answers, in the DAPO answer format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl_megatron.rewards.math import extract_answer, math_reward

# The answers of the first 60 items of each benchmark file in ../shared/data/benchmarks, copied so that the test
# does not depend on where the checkout lives.
ANSWERS = json.loads((Path(__file__).with_name("benchmark_answers.json")).read_text())["answers"]


def answers(name: str) -> list[str]:
    out = []
    for a in ANSWERS[name]:
        a = a[0] if isinstance(a, list) else a
        a = str(int(a)) if isinstance(a, float) and a.is_integer() else str(a)
        out.append(a.strip())
    return out


@pytest.mark.parametrize("name", ["math500", "aime2024", "amc", "minerva", "olympiadbench"])
def test_the_gold_answer_in_dapo_format_scores_one_and_another_scores_zero(name):
    gold = answers(name)
    right = [math_reward(f"Some reasoning.\nAnswer: {a}", a) for a in gold]
    assert sum(right) >= 0.95 * len(gold), [a for a, r in zip(gold, right, strict=True) if r < 1]
    wrong = [math_reward(f"Answer: {b}", a) for a, b in zip(gold, gold[1:] + gold[:1], strict=True) if a != b]
    assert sum(wrong) <= 0.05 * len(wrong)


def test_extraction_follows_the_prompt_format():
    assert extract_answer("x\nAnswer: $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("Answer: 3\nwait\nAnswer: 4") == "4"  # the last one counts
    assert extract_answer("the result is \\boxed{7}") == "the result is \\boxed{7}"
    assert extract_answer("the result is 7") is None


def test_equivalent_forms_and_missing_answers():
    assert math_reward("Answer: 0.5", "\\frac{1}{2}") == 1.0
    assert math_reward("so \\boxed{12}", "12") == 1.0
    assert math_reward("I think it is 12", "12") == 0.0  # no Answer: line and no box
    assert math_reward("Answer: 13", "12") == 0.0

"""Every gold answer of the shipped benchmarks, in each style they use, is read and graded: it scores 1 against
itself in the DAPO answer format, and almost never against another problem's answer; known equivalent and known
wrong forms of each style."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl_megatron.errors import UserError
from flowrl_megatron.evaluation.benchmarks import NAMES, gold_answer, load_benchmark, resolve
from flowrl_megatron.rewards.math import math_reward

GOLD = json.loads(Path(__file__).with_name("benchmark_gold.json").read_text())["benchmarks"]


@pytest.mark.parametrize("name", NAMES)
def test_every_gold_answer_grades_itself_and_not_its_neighbour(name):
    answers = [gold_answer(row) for row in GOLD[name]]
    assert all(answers)
    failed = [a for a in answers if math_reward(f"Let me think.\nAnswer: {a}", a) != 1.0]
    assert not failed, failed[:5]
    pairs = [(a, b) for a, b in zip(answers, answers[1:] + answers[:1], strict=True) if a != b]
    false_positives = sum(math_reward(f"Answer: {b}", a) for a, b in pairs)
    assert false_positives <= 0.01 * len(pairs)


@pytest.mark.parametrize(("response", "gold", "score"), [
    ("Answer: 142", "142.0", 1.0),  # AMC floats
    ("Answer: 142.5", "142.0", 0.0),
    ("Answer: \\frac{14}{3}", "\\frac{14}{3}", 1.0),  # LaTeX fractions and expressions
    ("Answer: 14/3", "\\frac{14}{3}", 1.0),
    ("Answer: \\frac{3}{14}", "\\frac{14}{3}", 0.0),
    ("Answer: (3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),  # tuples
    ("Answer: (\\frac{\\pi}{2}, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0),
    ("Answer: [-2, 5)", "[-2,5)", 1.0),  # intervals
    ("Answer: (-2, 5)", "[-2,5)", 0.0),
    ("Answer: $84$, $69$", "['$69$,$84$']", 1.0),  # OlympiadBench lists of answers, any order
    ("Answer: $69$", "['$69$,$84$']", 0.0),
    ("Answer: 32348", "\\$32,\\!348", 1.0),  # currency and thin spaces
    ("Answer: 9.6", "['9.6\\n']", 1.0),  # Minerva list strings
    ("Answer: 8.7 \\times 10^{8}", "8.7 \\times 10^{8}", 1.0),
])
def test_answer_styles(response, gold, score):
    assert math_reward(response, gold_answer({"answer": gold})) == score


def test_gsm8k_answers_come_from_the_solution():
    assert gold_answer({"answer": "None", "solution": "5 + 13 = 18\n#### 1,800"}) == "1800"


def test_user_files_and_unknown_names(tmp_path):
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"problem": "1+1?", "answer": 2.0}) + "\n" + json.dumps({"problem": "x"}) + "\n")
    assert resolve(str(user), tmp_path) == user
    with pytest.raises(UserError, match="row 1 has no answer"):
        load_benchmark(user)
    assert load_benchmark(user, limit=1)[0].answer == "2"
    with pytest.raises(UserError, match="neither a file nor"):
        resolve("aime2031", tmp_path)

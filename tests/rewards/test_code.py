"""Code rewards on real benchmark items: LeetCode reference solutions pass their functional checks in the sandbox
and broken ones fail; a Codeforces stdin/stdout case; through the reward pool as training uses it."""

from __future__ import annotations

import json
from pathlib import Path

from flowrl_megatron.evaluation.benchmarks import gold_answer
from flowrl_megatron.rewards.code import code_reward, code_tests, extract_code
from flowrl_megatron.rewards.pool import RewardPool

SAMPLES = json.loads(Path(__file__).with_name("code_samples.json").read_text())
SORT_PAIRS = ("t = int(input())\nfor _ in range(t):\n    a, b = map(int, input().split())\n"
              "    print(min(a, b), max(a, b))")


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def test_extract_code_takes_the_last_block():
    assert extract_code("```python\nx = 1\n```\nbetter:\n```\nx = 2\n```") == "x = 2\n"
    assert extract_code("no code here") is None


def test_leetcode_reference_solutions_pass_and_broken_ones_fail():
    answers = [gold_answer({"tests": item["tests"]}) for item in SAMPLES["leetcode"]]
    right = [code_reward(fenced(item["solution"]), a) for item, a in zip(SAMPLES["leetcode"], answers, strict=True)]
    assert sum(right) == len(right)
    every_method_returns_none = ("\nSolution = type('Solution', (Solution,), {name: lambda self, *a, **k: None "
                                 "for name in dir(Solution) if not name.startswith('_')})\n")
    broken = [item["solution"] + every_method_returns_none for item in SAMPLES["leetcode"][:10]]
    assert sum(code_reward(fenced(code), a) for code, a in zip(broken, answers[:10], strict=True)) == 0


def test_codeforces_stdin_stdout():
    answer = gold_answer({"tests": SAMPLES["codeforces"][0]["tests"]})
    assert code_tests(fenced(SORT_PAIRS), answer) == (1, 1)
    assert code_tests(fenced("t = int(input())\nfor _ in range(t):\n    print(input())"), answer) == (0, 1)
    assert code_tests("no code", answer) == (0, 1)


def test_the_reward_pool_runs_code_rewards():
    answer = gold_answer({"tests": SAMPLES["codeforces"][0]["tests"]})
    pool = RewardPool("code", workers=1, timeout_s=30.0)
    try:
        scores = pool.score([fenced(SORT_PAIRS), fenced("while True: pass")], [answer, answer])
    finally:
        pool.close()
    assert scores.rewards == [1.0, 0.0] and scores.timeouts == 0
    assert scores.fractions == [1.0, 0.0] and scores.mean_fraction == 0.5

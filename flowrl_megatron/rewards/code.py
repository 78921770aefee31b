"""Code rewards: the response's last Python code block run against the problem's tests in the sandbox.

The answer field holds the tests as JSON (``flowrl_megatron.evaluation.benchmarks`` stores them so): either a
list of ``{"input", "output"}`` stdin/stdout cases (Codeforces), compared line by line with trailing whitespace
ignored, or ``{"functional": CHECK}``, Python that asserts on the program's definitions (LeetCode), run after the
program with the usual LeetCode imports. Reward: 1 when every test passes, else 0, carrying the fraction passed
(stdin/stdout cases stop at the first failure, so the fraction counts the cases passed before it).
"""

from __future__ import annotations

import json
import re

from flowrl_megatron.rewards.sandbox import Limits, run_program

_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
# What LeetCode's judge has imported before a solution runs.
LEETCODE_PRELUDE = "".join(f"from {m} import *\n" for m in ("typing", "collections", "functools", "itertools", "heapq",
                                                            "bisect", "math", "string")) + "import math, string, re\n\n"
LIMITS = Limits(wall_s=6.0, cpu_s=4)


def extract_code(response: str) -> str | None:
    """The last fenced code block of the response, or None."""
    blocks = _BLOCK.findall(response)
    return blocks[-1].strip() + "\n" if blocks else None


def _same_output(got: str, want: str) -> bool:
    lines = lambda text: [line.rstrip() for line in text.strip().splitlines()]  # noqa: E731
    return lines(got) == lines(want)


def code_tests(response: str, answer: str, limits: Limits = LIMITS) -> tuple[int, int]:
    """(tests passed, tests run) for the response's program."""
    tests = json.loads(answer)
    code = extract_code(response)
    if isinstance(tests, dict) and "functional" in tests:
        if code is None:
            return 0, 1
        result = run_program(LEETCODE_PRELUDE + code + "\n\n" + tests["functional"] + "\n", limits=limits)
        return int(result.returncode == 0), 1
    if code is None:
        return 0, len(tests)
    passed = 0
    for case in tests:
        result = run_program(code, stdin=case["input"], limits=limits)
        if result.returncode != 0 or not _same_output(result.stdout, case["output"]):
            break  # the reward needs all; later cases would only cost time
        passed += 1
    return passed, len(tests)


class Graded(float):
    """A reward (a float like any other) that also carries the fraction of its tests that passed, which the
    reward pool reports and the trainer logs (reward/test_pass_fraction)."""

    fraction: float

    def __new__(cls, reward: float, fraction: float) -> Graded:
        graded = super().__new__(cls, reward)
        graded.fraction = fraction
        return graded


def code_reward(response: str, answer: str) -> Graded:
    passed, total = code_tests(response, answer)
    return Graded(float(passed == total and total > 0), passed / max(total, 1))

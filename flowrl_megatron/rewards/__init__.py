"""Reward functions by name: ``REWARDS[name](response_text, answer) -> float`` (1.0 correct, 0.0 wrong).

Each runs inside ``RewardPool``'s worker processes, under a per-sample time limit. A name of the form
``package.module:function`` selects a user's own function with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flowrl_megatron.rewards.code import code_reward, extract_code
from flowrl_megatron.rewards.math import extract_answer, math_reward
from flowrl_megatron.rewards.synthetic import answer_set_reward, first_line

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "answer_set": answer_set_reward,
    "code": code_reward,  # runs the program in the sandbox (flowrl_megatron.rewards.sandbox; needs root)
}


# What each reward grades: the final answer of a response, for counting distinct answers ("" when none).
FINAL_ANSWERS: dict[str, Callable[[str], str | None]] = {"math": extract_answer, "answer_set": first_line,
                                                         "code": extract_code}


def final_answer(reward: str, response: str) -> str:
    """The response's final answer as ``reward`` reads it; a user reward's answer is the whole stripped response."""
    extract = FINAL_ANSWERS.get(reward)
    return (extract(response) if extract else response.strip()) or ""


def resolve_reward(name: str) -> RewardFn:
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    return REWARDS[name]

"""Reward functions by name: ``REWARDS[name](response_text, answer) -> float`` (1.0 correct, 0.0 wrong).

Each runs inside ``RewardPool``'s worker processes, under a per-sample time limit. A name of the form
``package.module:function`` selects a user's own function with the same signature.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flowrl_megatron.rewards.math import math_reward
from flowrl_megatron.rewards.synthetic import answer_set_reward

RewardFn = Callable[[str, str], float]

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "answer_set": answer_set_reward,
}


def resolve_reward(name: str) -> RewardFn:
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    return REWARDS[name]

"""Synthetic tasks with many valid answers per prompt (the CPU demo's task): the answer field lists them."""

from __future__ import annotations


def answer_set_reward(response: str, answer: str) -> float:
    """1 if the response's first line, stripped, is one of the ``|``-separated valid answers."""
    lines = response.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return float(first in {a.strip() for a in str(answer).split("|")})

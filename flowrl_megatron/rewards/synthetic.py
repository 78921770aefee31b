"""Synthetic tasks with many valid answers per prompt (the CPU demo's task): the answer field lists them."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from flowrl_megatron.files import write_text_atomic


def first_line(response: str) -> str:
    """The answer-set task's final answer: the response's first line, stripped."""
    lines = response.strip().splitlines()
    return lines[0].strip() if lines else ""


def answer_set_reward(response: str, answer: str) -> float:
    """1 if the response's first line, stripped, is one of the ``|``-separated valid answers."""
    return float(first_line(response) in {a.strip() for a in str(answer).split("|")})


def answer_set_rows(count: int = 64, answers_per_prompt: int = 3, seed: int = 0) -> list[dict[str, str]]:
    """Distinct prompts "<letter><digit>=" (at most 260), each with ``answers_per_prompt`` valid letters."""
    rng = random.Random(seed)
    prompts = rng.sample([a + d + "=" for a in string.ascii_lowercase for d in string.digits], count)
    return [{"prompt": p, "answer": "|".join(rng.sample(string.ascii_lowercase, answers_per_prompt))} for p in prompts]


def write_answer_set_dataset(path: str | Path, count: int = 64, answers_per_prompt: int = 3, seed: int = 0) -> Path:
    """The answer-set task as JSONL (fields ``prompt`` and ``answer``), for ``reward.name=answer_set``."""
    rows = answer_set_rows(count, answers_per_prompt, seed)
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

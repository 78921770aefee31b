"""Synthetic tasks with many valid answers per prompt (the CPU demo's task): the answer field lists them."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from flowrl_megatron.files import write_text_atomic


def answer_set_reward(response: str, answer: str) -> float:
    """1 if the response's first line, stripped, is one of the ``|``-separated valid answers."""
    lines = response.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return float(first in {a.strip() for a in str(answer).split("|")})


def write_answer_set_dataset(path: str | Path, count: int = 64, answers_per_prompt: int = 3, seed: int = 0) -> Path:
    """A JSONL task for tiny models: prompt "ab=" (two characters); valid answers: ``answers_per_prompt`` letters."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    rows = []
    for _ in range(count):
        prompt = rng.choice(letters) + rng.choice(string.digits) + "="
        rows.append({"prompt": prompt, "answer": "|".join(rng.sample(letters, answers_per_prompt))})
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))

"""Benchmarks as (problem, answer) pairs, read through ``datasets`` from local JSON/JSONL/parquet files.

The shipped files (../shared/data/benchmarks, SOURCES.md) store answers in several shapes: LaTeX strings, floats
written as "142.0", Python-list strings such as "['9.6\\n']" (Minerva, OlympiadBench: several parts joined by
commas), and, in GSM8K, only inside the solution after "####". ``gold_answer`` turns each into one string that
math-verify parses. A user file with the same fields (``problem`` and ``answer``) works as a benchmark too.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from flowrl_megatron.errors import UserError

NAMES = ("aime2024", "amc", "math500", "minerva", "olympiadbench", "gsm8k")


@dataclass(frozen=True)
class Problem:
    problem: str
    answer: str


def gold_answer(row: dict) -> str:
    """The answer as a grader takes it: a string (code benchmarks: their tests as JSON)."""
    if row.get("answer") is None and row.get("tests") is not None:  # LeetCode, Codeforces
        tests = row["tests"]
        return tests if isinstance(tests, str) else json.dumps(tests)
    answer = row.get("answer")
    text = "" if answer is None else str(answer).strip()
    if text in ("", "None") and "####" in str(row.get("solution", "")):  # GSM8K
        text = str(row["solution"]).rsplit("####", 1)[1].strip().replace(",", "")
    if isinstance(answer, list) or text.startswith("["):
        try:
            parts = answer if isinstance(answer, list) else ast.literal_eval(text)  # literals only, never code
            text = ", ".join(str(p).strip() for p in parts)
        except (ValueError, SyntaxError):
            pass
    if isinstance(answer, float) or text.replace(".", "", 1).lstrip("-").isdigit():
        value = float(text)
        text = str(int(value)) if value.is_integer() else text
    return text


def resolve(spec: str, data_dir: Path) -> Path:
    """A benchmark name (a file ``<name>.json`` in ``data_dir``) or a path to a user file."""
    path = Path(spec)
    if path.suffix in (".json", ".jsonl", ".parquet") and path.is_file():
        return path
    candidate = data_dir / f"{spec}.json"
    if not candidate.is_file():
        raise UserError(f"benchmark {spec!r} is neither a file nor {candidate}; pass --data-dir with the benchmark "
                        f"files ({', '.join(NAMES)}) or a path to a .json/.jsonl/.parquet file.")
    return candidate


def load_benchmark(path: Path, limit: int = 0) -> list[Problem]:
    from flowrl_megatron.data.prompts import read_table

    table = read_table(path)
    problems = []
    for i, row in enumerate(table):
        if not row.get("problem"):
            raise UserError(f"{path} row {i} has no 'problem' field; benchmark files need 'problem' and 'answer'.")
        answer = gold_answer(row)
        if not answer:
            raise UserError(f"{path} row {i} has no answer (field 'answer', or a GSM8K solution ending in ####).")
        problems.append(Problem(str(row["problem"]), answer))
        if limit and len(problems) == limit:
            break
    return problems

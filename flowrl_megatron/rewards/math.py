"""Math answers graded with math-verify, following the DAPO prompt format the paper trains with.

The response's answer is what follows its last ``Answer:`` (the format the prompt asks for); a response
without one is graded on its last ``\\boxed{...}``, as math-verify extracts it. Anything else scores 0.
"""

from __future__ import annotations

import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)
_CONFIGS = (LatexExtractionConfig(), ExprExtractionConfig())
logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its timeouts are off


def extract_answer(response: str) -> str | None:
    """The final answer the response gives, or None."""
    found = _ANSWER_LINE.findall(response)
    if found:
        answer = found[-1].strip().rstrip(".").strip().strip("$").strip()
        return answer or None
    return response if "\\boxed" in response else None


def _as_math(text: str) -> str:
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def math_reward(response: str, answer: str) -> float:
    candidate = extract_answer(response)
    if candidate is None or not str(answer).strip():
        return 0.0
    # math-verify's own signal-based timeouts are off: RewardPool bounds the whole sample.
    gold = parse(_as_math(str(answer)), extraction_config=_CONFIGS, parsing_timeout=None)
    pred = parse(_as_math(candidate), extraction_config=_CONFIGS, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))

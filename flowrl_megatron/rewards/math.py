"""Math answers graded with math-verify, following the DAPO prompt format the paper trains with.

The response's answer is what follows its last ``Answer:`` (the format the prompt asks for); a response
without one is graded on the contents of its last ``\\boxed{...}``. Anything else scores 0.
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
        answer = found[-1].strip().rstrip(".").strip()
        if answer.count("$") == 2 and answer.startswith("$") and answer.endswith("$"):  # one delimited expression
            answer = answer[1:-1].strip()
        return answer or None
    return _last_boxed(response)


def _last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i].strip() or None
    return None


_MATH_SEGMENT = re.compile(r"\$([^$]+)\$")


def _as_math(text: str) -> str:
    """Delimited for math-verify: currency signs and LaTeX thin spaces dropped ("\\$32,\\!348"), several
    ``$...$`` parts (OlympiadBench's multiple answers, "$69$,$84$") joined into one comma-separated set."""
    text = text.replace("\\$", "").replace("\\!", "")
    segments = _MATH_SEGMENT.findall(text)
    if len(segments) > 1:
        return "$" + ", ".join(s.strip() for s in segments) + "$"
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

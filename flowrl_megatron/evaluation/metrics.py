"""Statistics of n samples per problem: unbiased pass@k, accuracy, and how many different answers are right.

pass@k is the unbiased estimator of Chen et al. (2021): the probability that at least one of k samples drawn
without replacement from the n is correct, 1 - C(n-c, k) / C(n, k), averaged over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct among ``n`` samples (k <= n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"need 0 < k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def report_ks(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def group_metrics(answers: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Per-problem sample statistics averaged over problems; every problem must have the same n samples.

    ``answers`` are the samples' final answers (compared after stripping whitespace): ``distinct`` counts the
    different ones among a problem's n samples, ``distinct_correct`` the different correct ones.
    """
    n = len(answers[0])
    if any(len(a) != n for a in answers) or [len(c) for c in correct] != [len(a) for a in answers]:
        raise ValueError("every problem needs the same number of answers and correctness flags")
    out = {f"pass@{k}": 0.0 for k in report_ks(n)}
    out.update(distinct=0.0, distinct_correct=0.0)
    for group, flags in zip(answers, correct, strict=True):
        c = sum(flags)
        for k in report_ks(n):
            out[f"pass@{k}"] += pass_at_k(n, c, k)
        out["distinct"] += len({a.strip() for a in group})
        out["distinct_correct"] += len({a.strip() for a, ok in zip(group, flags, strict=True) if ok})
    return {k: v / len(answers) for k, v in out.items()}

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

    ``answers`` are the samples' final answers (compared after stripping whitespace; an empty one is no answer):
    ``distinct`` counts the different ones among a problem's n samples, ``distinct_correct`` the different correct
    ones.
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
        out["distinct"] += len({a.strip() for a in group} - {""})
        out["distinct_correct"] += len({a.strip() for a, ok in zip(group, flags, strict=True) if ok} - {""})
    return {k: v / len(answers) for k, v in out.items()}


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def text_diversity(groups: Sequence[Sequence[str]], n: int = 4) -> dict[str, float]:
    """How different a problem's sampled responses are from each other, averaged over problems.

    ``distinct_ngrams``: distinct word n-grams over all n-grams of the problem's samples (1 = no n-gram repeats
    anywhere). ``pairwise_similarity``: mean Jaccard similarity of the samples' n-gram sets over all pairs (1 = all
    samples alike). Responses shorter than n words count as one n-gram of their words.
    """
    distinct = similarity = 0.0
    for group in groups:
        grams = [_ngrams(t, n) or [tuple(t.split())] for t in group]
        flat = [g for gs in grams for g in gs]
        distinct += len(set(flat)) / max(len(flat), 1)
        sets = [set(gs) for gs in grams]
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        similarity += sum(len(a & b) / max(len(a | b), 1) for a, b in pairs) / max(len(pairs), 1)
    return {"distinct_ngrams": distinct / len(groups), "pairwise_similarity": similarity / len(groups)}

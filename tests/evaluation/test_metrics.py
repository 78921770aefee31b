"""pass@k against brute-force enumeration of k-subsets; distinct-answer counts on a worked example."""

from __future__ import annotations

import itertools

import pytest

from flowrl_megatron.evaluation.metrics import group_metrics, pass_at_k, report_ks


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(flags, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_pass_at_1_is_the_accuracy_and_bad_arguments_are_refused():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_reported_ks():
    assert report_ks(16) == [1, 2, 4, 8, 16]
    assert report_ks(6) == [1, 2, 4, 6]
    assert report_ks(1) == [1]


def test_group_metrics_average_over_problems():
    answers = [["a", "a ", "b", "c"], ["x", "y", "y", "z"]]
    correct = [[True, True, True, False], [False, False, False, False]]
    m = group_metrics(answers, correct)
    assert m["pass@1"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["distinct"] == pytest.approx((3 + 3) / 2)  # "a" and "a " are one answer
    assert m["distinct_correct"] == pytest.approx((2 + 0) / 2)
    with pytest.raises(ValueError):
        group_metrics([["a"], ["b", "c"]], [[True], [True, False]])


def test_text_diversity_on_worked_examples():
    from flowrl_megatron.evaluation.metrics import text_diversity

    same = text_diversity([["a b c d e", "a b c d e"]])
    assert same == {"distinct_ngrams": 0.5, "pairwise_similarity": 1.0}  # 2 distinct of 4 four-grams
    apart = text_diversity([["a b c d", "e f g h"]])
    assert apart == {"distinct_ngrams": 1.0, "pairwise_similarity": 0.0}
    short = text_diversity([["x", "x", "y"]])  # shorter than n: one n-gram of its words
    assert short["distinct_ngrams"] == pytest.approx(2 / 3) and short["pairwise_similarity"] == pytest.approx(1 / 3)

"""Vocab-parallel log-probs and entropy equal a float64 full-softmax reference, values and gradients."""

from __future__ import annotations

import pytest

from tests.algorithms.workers import compare_with_reference
from tests.distributed import run_distributed

TOL = 1e-5


def check(r: dict) -> None:
    assert r["logprob"] <= TOL and r["entropy"] <= TOL
    assert r["grad"] <= TOL
    assert r["grad_scale"] > 0.1 or r["valid_columns"] == 0  # non-trivial wherever the slice has real ids
    assert r["padded_grad_zero"]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_entropy", [True, False])
def test_tp1_matches_float64_reference(chunk_tokens, temperature, use_entropy):
    check(compare_with_reference(tp=1, chunk_tokens=chunk_tokens, temperature=temperature, use_entropy=use_entropy))


@pytest.mark.distributed
def test_tp2_matches_float64_reference_without_gathering_the_vocabulary():
    for r in run_distributed("tests.algorithms.workers:compare_with_reference", 2, tp=2):
        check(r)


@pytest.mark.distributed
def test_tp4_with_a_slice_that_is_all_padding():
    """Vocabulary 48 padded to 64 over 4 ranks: rank 3's slice (ids 48-63) is all padding."""
    results = run_distributed("tests.algorithms.workers:compare_with_reference", 4, tp=4, vocab_size=48)
    assert [r["valid_columns"] for r in results] == [16, 16, 16, 0]
    for r in results:
        check(r)

"""Vocab-parallel log-probs and entropy equal a float64 full-softmax reference, values and gradients."""

from __future__ import annotations

import pytest

from tests.algorithms.workers import compare_with_reference
from tests.distributed import run_distributed

TOL = 1e-5


def check(r: dict) -> None:
    assert r["logprob"] <= TOL and r["entropy"] <= TOL
    assert r["grad"] <= TOL and r["grad_scale"] > 0.1
    assert r["padded_grad_zero"]


@pytest.mark.parametrize("chunk_tokens", [1, 4, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tp1_matches_float64_reference(chunk_tokens, temperature):
    check(compare_with_reference(tp=1, chunk_tokens=chunk_tokens, temperature=temperature))


@pytest.mark.distributed
def test_tp2_matches_float64_reference_without_gathering_the_vocabulary():
    for r in run_distributed("tests.algorithms.workers:compare_with_reference", 2, tp=2):
        check(r)

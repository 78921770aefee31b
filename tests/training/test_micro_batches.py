"""Micro-batch plans: budgets hold, every sample is used once, data-parallel loads are even; packed layout maps."""

from __future__ import annotations

import random

import pytest
import torch

from flowrl_megatron.training.batch import Batch
from flowrl_megatron.training.micro_batches import (
    MicroBatching,
    balanced_split,
    data_parallel_split,
    micro_batches,
    padding_fraction,
    plan,
)


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Prompt ~ 50-300 tokens, response long-tailed up to 2048 (reasoning-like)."""
    rng = random.Random(seed)
    return [rng.randint(50, 300) + min(int(rng.lognormvariate(6.0, 0.8)), 2048) for _ in range(n)]


@pytest.mark.parametrize("packed", [True, False])
def test_plan_keeps_every_micro_batch_within_its_token_budget(packed):
    lengths = skewed_lengths(256)
    batching = MicroBatching(max_tokens=4096, packed=packed)
    bins = plan(lengths, batching)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # each sample exactly once
    for b in bins:
        cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
        assert cost <= 4096
    # First-fit decreasing is near the lower bound on the number of micro-batches.
    assert len(bins) <= sum(lengths) / 4096 * (1.1 if packed else 1.6) + 1


def test_plan_refuses_a_sample_longer_than_the_budget():
    with pytest.raises(ValueError, match="sample of 900 tokens exceeds the micro-batch budget of 800"):
        plan([100, 900], MicroBatching(max_tokens=800, packed=True))


def test_fixed_plans_are_consecutive_rows():
    assert plan([5, 9, 3, 7], MicroBatching(micro_batch_size=2)) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size=3"):
        plan([5, 9, 3, 7], MicroBatching(micro_batch_size=3))


def test_balanced_split_gives_ranks_equal_token_loads():
    lengths = skewed_lengths(512, seed=1)
    parts = balanced_split(lengths, 8)
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)  # longest-first greedy: within one sample
    contiguous = [sum(lengths[r * 64 : (r + 1) * 64]) for r in range(8)]
    assert max(loads) - min(loads) < (max(contiguous) - min(contiguous)) / 4


def test_data_parallel_split_without_a_budget_is_contiguous_whole_micro_batches():
    assert data_parallel_split([1] * 8, 2, MicroBatching(micro_batch_size=2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="do not split into dp=2 ranks x whole micro-batches of 3"):
        data_parallel_split([1] * 8, 2, MicroBatching(micro_batch_size=3))


def rows_batch(lengths: list[int], prompt: int = 2) -> Batch:
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    prompt_mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    response_mask = torch.zeros_like(prompt_mask)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.arange(1, n + 1) + 100 * i
        prompt_mask[i, :prompt] = True
        response_mask[i, prompt:n] = True
    return Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask,
                 advantages=torch.arange(len(lengths), dtype=torch.float32))


def test_packed_micro_batch_maps_tokens_and_back():
    batch = rows_batch([3, 5, 4])
    (mb,) = micro_batches(batch, MicroBatching(max_tokens=12, packed=True))
    assert mb.index.tolist() == [0, 1, 2] and mb.tokens == 12
    inputs = mb.model_inputs(with_prompt_mask=True)
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 101, 102, 103, 104, 105, 201, 202, 203, 204]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert inputs["sample_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]]
    assert inputs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 8, 12]
    assert inputs["packed_seq_params"].max_seqlen_q == 5 and inputs["attention_mask"] is None
    rows = mb.to_rows(inputs["input_ids"].float())
    # Each sample's first position is 0 (nothing predicts it); past a sample's end, 0.
    assert rows.tolist() == [[0, 2, 3, 0, 0], [0, 102, 103, 104, 105], [0, 202, 203, 204, 0]]


def test_padding_fraction_counts_padded_rows_only():
    batch = rows_batch([3, 5, 4, 8])
    padded = micro_batches(batch, MicroBatching(micro_batch_size=2))
    assert [mb.tokens for mb in padded] == [2 * 5, 2 * 8]
    assert padding_fraction(padded) == pytest.approx(1 - 20 / 26)
    assert padding_fraction(micro_batches(batch, MicroBatching(max_tokens=20, packed=True))) == 0.0

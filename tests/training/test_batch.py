"""A step's rollout groups -> the batch the loss reads: DAPO's overlong shaping, normalised advantages, and overlong
filtering's ``keep`` (``training.batch.step_batch``, what the trainer's step starts from); each data-parallel
rank's rows of it."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.algorithms.advantages import group_normalized
from flowrl_megatron.config import AlgorithmConfig, RewardConfig
from flowrl_megatron.data.prompts import Prompt
from flowrl_megatron.rollout.client import Sample
from flowrl_megatron.rollout.groups import RolloutGroup
from flowrl_megatron.training.batch import Batch, local_rows, step_batch
from flowrl_megatron.training.micro_batches import MicroBatching

LIMIT = 4  # rollout.max_response_tokens
# (response length, finish reason, reward) of each prompt's three samples
GROUPS = [[(1, "stop", 1.0), (3, "stop", 0.0), (4, "length", 1.0)],
          [(2, "stop", 0.0), (4, "length", 0.0), (4, "length", 1.0)]]


def groups() -> list[RolloutGroup]:
    out = []
    for k, samples in enumerate(GROUPS):
        prompt = Prompt(row=k, token_ids=[5, 6 + k], answer="a")
        out.append(RolloutGroup(
            prompt=prompt, order=k, first_version=0, last_version=0,
            samples=[Sample(k, i, list(range(10, 10 + n)), [-1.0] * n, reason, 0)
                     for i, (n, reason, _) in enumerate(samples)],
            rewards=[r for _, _, r in samples]))
    return out


@pytest.mark.parametrize("name", ["flowrl", "ppo"])
def test_overlong_shaping_then_normalisation_and_filtering(name):
    reward = RewardConfig(overlong_buffer=2, overlong_penalty=1.0)
    batch, penalty = step_batch(groups(), AlgorithmConfig(name=name, mask_truncated=True), reward, LIMIT)
    # 0 up to LIMIT - buffer = 2 tokens, then -1/2 per token: -0.5 at 3 tokens, -1 at the limit
    assert penalty.tolist() == [0.0, -0.5, -1.0, 0.0, -1.0, -1.0]
    raw = torch.tensor([r for samples in GROUPS for _, _, r in samples])
    assert torch.equal(batch.rewards, raw + penalty)
    if name == "flowrl":  # group-normalised shaped rewards
        assert torch.equal(batch.advantages, group_normalized(raw + penalty, torch.tensor([0, 0, 0, 1, 1, 1])))
    else:  # PPO: raw (shaped) rewards, the critic is the baseline
        assert torch.equal(batch.advantages, raw + penalty)
    assert batch.keep.tolist() == [True, True, False, True, False, False]  # the truncated ones leave the loss
    assert batch.loss_mask().sum().item() == 1 + 3 + 2


def test_by_default_nothing_is_shaped_or_filtered():
    batch, penalty = step_batch(groups(), AlgorithmConfig(), RewardConfig(), LIMIT)
    assert not penalty.any() and batch.keep is None
    assert torch.equal(batch.rewards, torch.tensor([r for samples in GROUPS for _, _, r in samples]))
    assert batch.truncated.tolist() == [False, False, True, False, True, True]


def test_data_parallel_ranks_share_every_mini_batch():
    """Each mini-batch's rows go to the DP ranks once each: in equal contiguous shares, or by equal token loads."""
    lengths = torch.tensor([30, 5, 9, 7, 12, 3, 8, 6] + [10] * 8)
    position = torch.arange(30).expand(16, 30)
    full = Batch(tokens=torch.zeros(16, 30, dtype=torch.long), prompt_mask=position < 2,
                 response_mask=(position >= 2) & (position < lengths[:, None]))
    for batching in (MicroBatching(micro_batch_size=2), MicroBatching(max_tokens=64)):
        ranks = [local_rows(full, 8, 2, batching, r) for r in range(2)]
        for k in range(2):  # two mini-batches of 8 rows
            assert sorted(ranks[0][k].tolist() + ranks[1][k].tolist()) == list(range(8 * k, 8 * k + 8))
    contiguous = [local_rows(full, 8, 2, MicroBatching(micro_batch_size=2), r)[0] for r in range(2)]
    assert [c.tolist() for c in contiguous] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    balanced = [local_rows(full, 8, 2, MicroBatching(max_tokens=64), r)[0] for r in range(2)]
    gap = abs(int(lengths[balanced[0]].sum() - lengths[balanced[1]].sum()))
    assert gap <= 2 < abs(int(lengths[contiguous[0]].sum() - lengths[contiguous[1]].sum()))  # 2 tokens, not 22

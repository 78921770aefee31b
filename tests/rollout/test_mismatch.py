"""Train-vs-rollout log-prob mismatch metrics and the stop above the limit."""

from __future__ import annotations

import math

import pytest
import torch

from flowrl_megatron.rollout.mismatch import StaleWeightsError, check_mismatch, logprob_mismatch


def test_metrics_count_only_response_tokens():
    train = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -0.5, -0.5, -0.5]])
    rollout = torch.tensor([[5.0, -1.0, -2.5, 3.0], [0.0, -0.5, -0.3, -0.5]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    m = logprob_mismatch(train, rollout, mask)
    assert m.tokens == 5
    assert m.mean_abs_diff == pytest.approx((0 + 0.5 + 0 + 0.2 + 0) / 5)
    assert m.max_abs_diff == pytest.approx(0.5)
    assert m.mean_prob_ratio == pytest.approx((1 + math.exp(0.5) + 1 + math.exp(-0.2) + 1) / 5)


def test_identical_logprobs_pass_and_stale_weights_stop_the_run():
    lp = -torch.rand(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    same = logprob_mismatch(lp, lp.clone(), mask)
    assert (same.mean_abs_diff, same.mean_prob_ratio) == (0.0, 1.0)
    check_mismatch(same, max_mean_abs_diff=1e-3, step=7)
    with pytest.raises(StaleWeightsError, match=r"step 7: rollout log-probs differ from the trainer's by 0\.1"):
        check_mismatch(logprob_mismatch(lp, lp - 0.1, mask), max_mean_abs_diff=1e-3, step=7)

"""The reward pool: time limits that never hang a step, crashes counted, order kept."""

from __future__ import annotations

import time

from flowrl_megatron.rewards.pool import RewardPool


def test_scores_in_order_and_counts_timeouts_and_errors():
    pool = RewardPool("tests.rewards.slow_rewards:sleeps_on_one", workers=2, timeout_s=1.0)
    try:
        start = time.monotonic()
        s = pool.score(["a", "hang", "b", "x", "hang"], ["a", "hang", "c", "x", "hang"])
        assert s.rewards == [1.0, 0.0, 0.0, 1.0, 0.0] and s.timeouts == 2 and s.errors == 0
        assert time.monotonic() - start < 10
        errors = RewardPool("tests.rewards.slow_rewards:raises_on_one", workers=1, timeout_s=1.0)
        scored = errors.score(["crash", "y"], ["crash", "y"])
        assert scored.__dict__ == {"rewards": [0.0, 1.0], "status": ["error", "ok"], "fractions": [None, None]}
        assert (scored.timeouts, scored.errors) == (0, 1)
        assert scored.part(1, 2).__dict__ == {"rewards": [1.0], "status": ["ok"], "fractions": [None]}
        errors.close()
    finally:
        pool.close()


def test_a_hang_no_signal_reaches_is_ended_by_the_batch_deadline():
    pool = RewardPool("tests.rewards.slow_rewards:deaf_on_one", workers=1, timeout_s=0.5)
    pool_deadline = 0.5 * (2 + 1) + 5  # RewardPool's own rule for 2 samples on 1 worker
    try:
        start = time.monotonic()
        s = pool.score(["deaf", "z"], ["deaf", "z"])
        assert time.monotonic() - start < pool_deadline + 10
        assert s.rewards == [0.0, 0.0] and s.timeouts == 2
        assert pool.score(["q"], ["q"]).rewards == [1.0]  # a fresh pool took over
    finally:
        pool.close()

"""The reward pool: time limits that never hang a step, crashes counted, dead workers replaced with no sample
lost, order kept."""

from __future__ import annotations

import os
import signal
import threading
import time

from flowrl_megatron.rewards.pool import ATTEMPTS, GRACE_S, RewardPool


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


def test_a_hang_no_signal_reaches_kills_that_worker_alone_after_the_grace():
    pool = RewardPool("tests.rewards.slow_rewards:deaf_on_one", workers=1, timeout_s=0.5)
    try:
        start = time.monotonic()
        s = pool.score(["deaf", "z"], ["deaf", "z"])
        assert time.monotonic() - start < 0.5 + GRACE_S + 10
        assert s.status == ["timeout", "ok"] and s.rewards == [0.0, 1.0]  # the next sample on a fresh worker
        assert pool.replaced == 1 and pool.score(["q"], ["q"]).rewards == [1.0]
    finally:
        pool.close()


def test_a_worker_killed_mid_batch_is_replaced_and_its_sample_scored_again(capsys):
    """SIGKILL to a busy worker (the OOM killer): the pool notices at once (not at a deadline), starts a fresh
    worker, scores the lost sample again; every sample scored once, in order."""
    pool = RewardPool("tests.rewards.slow_rewards:slow", workers=2, timeout_s=30.0)
    try:
        responses = [f"r{i}" for i in range(8)]
        answers = [r if i % 2 else "other" for i, r in enumerate(responses)]
        victim = pool.pids[0]
        threading.Timer(1.2, os.kill, (victim, signal.SIGKILL)).start()  # mid-way through its third sample
        start = time.monotonic()
        s = pool.score(responses, answers)
        took = time.monotonic() - start
        assert s.status == ["ok"] * 8 and s.rewards == [float(i % 2) for i in range(8)]
        assert pool.replaced == 1 and victim not in pool.pids and len(pool.pids) == 2
        assert took < 20  # the batch (2 s), a worker start and one sample again; the old pool waited 155 s
        assert f"reward worker {victim} died (signal SIGKILL) while scoring a sample, which is scored again" \
            in capsys.readouterr().err
    finally:
        pool.close()


def test_a_sample_that_kills_every_worker_counts_as_an_error_and_the_batch_goes_on():
    pool = RewardPool("tests.rewards.slow_rewards:kills_its_worker_on_one", workers=1, timeout_s=5.0)
    try:
        s = pool.score(["a", "oom", "b"], ["a", "oom", "c"])
        assert s.status == ["ok", "error", "ok"] and s.rewards == [1.0, 0.0, 0.0] and pool.replaced == ATTEMPTS
    finally:
        pool.close()

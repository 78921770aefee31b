"""Misbehaving reward functions for the pool's tests, selected as ``tests.rewards.slow_rewards:NAME``."""

from __future__ import annotations

import os
import signal
import time


def sleeps_on_one(response: str, answer: str) -> float:
    """A Python-level hang on response "hang" (the per-sample timer interrupts it)."""
    while response == "hang":
        time.sleep(0.05)
    return float(response == answer)


def deaf_on_one(response: str, answer: str) -> float:
    """A hang no signal reaches (SIGALRM blocked, as in C code holding it): only killing the worker ends it."""
    if response == "deaf":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    return float(response == answer)


def raises_on_one(response: str, answer: str) -> float:
    if response == "crash":
        raise ValueError("grader bug")
    return float(response == answer)


def slow(response: str, answer: str) -> float:
    """Half a second per sample: long enough to kill a worker in the middle of one."""
    time.sleep(0.5)
    return float(response == answer)


def kills_its_worker_on_one(response: str, answer: str) -> float:
    """What the OOM killer does to a worker that a sample makes grow: SIGKILL, every time."""
    if response == "oom":
        os.kill(os.getpid(), signal.SIGKILL)
    return float(response == answer)

"""Score samples in worker processes, each under a time limit: a timeout scores 0 and is counted, never hangs.

Each sample runs under a ``SIGALRM`` timer in its worker (pure-Python loops in sympy and friends are
interrupted there). If a worker is stuck where no signal reaches it, the batch deadline kills the whole
pool, counts what did not finish as timeouts and starts a fresh pool.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass

from flowrl_megatron.processes import die_with_parent


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _score(name: str, response: str, answer: str, timeout_s: float) -> tuple[float, str, float | None]:
    """(reward, "ok" | "timeout" | "error", the fraction of checks passed when the reward reports one)."""
    from flowrl_megatron.rewards import resolve_reward

    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        reward = resolve_reward(name)(response, answer)
        return float(reward), "ok", getattr(reward, "fraction", None)
    except _Timeout:
        return 0.0, "timeout", None
    except Exception:  # a grader crash on odd model output scores as wrong, counted apart
        return 0.0, "error", None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Scores:
    rewards: list[float]
    status: list[str]  # per sample: "ok", "timeout" (scored 0) or "error" (the grader raised; scored 0)
    fractions: list[float | None]  # per sample, from rewards that check several things (code: tests passed)

    @property
    def timeouts(self) -> int:
        return self.status.count("timeout")

    @property
    def errors(self) -> int:
        return self.status.count("error")

    @property
    def mean_fraction(self) -> float | None:
        known = [f for f in self.fractions if f is not None]
        return sum(known) / len(known) if known else None

    def part(self, start: int, stop: int) -> Scores:
        """The scores of samples ``start..stop-1``."""
        return Scores(self.rewards[start:stop], self.status[start:stop], self.fractions[start:stop])


class RewardPool:
    """Callable from several threads (the rollout producer and the trainer's evaluation): calls take turns."""

    def __init__(self, name: str, workers: int, timeout_s: float) -> None:
        self.name, self.workers, self.timeout_s = name, workers, timeout_s
        self._ctx = multiprocessing.get_context("spawn")  # the trainer process has threads; no fork
        self._pool = self._new_pool()
        self._turn = threading.Lock()  # a pool replaced by one call's deadline must not end another call's jobs

    def _new_pool(self):
        """Workers that end with the trainer, even when it is killed with SIGKILL (they would score on forever)."""
        return self._ctx.Pool(self.workers, initializer=die_with_parent)

    def score(self, responses: list[str], answers: list[str]) -> Scores:
        with self._turn:
            return self._score(responses, answers)

    def _score(self, responses: list[str], answers: list[str]) -> Scores:
        jobs = [self._pool.apply_async(_score, (self.name, r, a, self.timeout_s))
                for r, a in zip(responses, answers, strict=True)]
        # Every sample gets its own limit; queued ones wait for a free worker first.
        deadline_s = self.timeout_s * (math.ceil(len(jobs) / self.workers) + 1) + 5.0
        end = time.monotonic() + deadline_s
        results: list[tuple[float, str, float | None]] = []
        for job in jobs:
            try:
                results.append(job.get(timeout=max(0.0, end - time.monotonic())))
            except multiprocessing.TimeoutError:
                break
        if len(results) < len(jobs):  # a worker no signal could stop: replace the pool
            self._pool.terminate()
            self._pool = self._new_pool()
            results += [(0.0, "timeout", None)] * (len(jobs) - len(results))
        return Scores([r for r, _, _ in results], [s for _, s, _ in results], [f for _, _, f in results])

    def close(self) -> None:
        self._pool.terminate()

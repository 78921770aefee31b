"""Score samples in worker processes, each under a time limit: a timeout scores 0 and is counted, never hangs, and
a worker that dies loses no sample.

Each sample runs under a ``SIGALRM`` timer in its worker (pure-Python loops in sympy and friends are interrupted
there). A worker stuck where no signal reaches it is killed once the sample's hard limit (the timer plus a grace)
has passed, and replaced; the sample counts as a timeout. A worker that dies (the OOM killer's SIGKILL, a crash in
C code) is replaced at once and its sample scored again on a fresh worker; a sample that kills its worker twice
counts as an error.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from flowrl_megatron.processes import die_with_parent

GRACE_S = 5.0  # past a sample's own timer, before its worker is killed
ATTEMPTS = 2  # workers a sample may kill before it counts as an error


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


def _serve(conn: Connection, name: str, timeout_s: float) -> None:
    """A worker: score what arrives on ``conn`` until the pool closes it."""
    die_with_parent()  # a trainer killed with SIGKILL takes its workers along (they would score on forever)
    while True:
        try:
            response, answer = conn.recv()
        except (EOFError, OSError):
            return
        conn.send(_score(name, response, answer, timeout_s))


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


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    job: int | None = None  # the sample it scores
    hard_end: float = 0.0  # when it is killed if it has not answered


class RewardPool:
    """Callable from several threads (the rollout producer and the trainer's evaluation): calls take turns."""

    def __init__(self, name: str, workers: int, timeout_s: float) -> None:
        self.name, self.timeout_s = name, timeout_s
        self._ctx = multiprocessing.get_context("spawn")  # the trainer process has threads; no fork
        self._workers = [self._start() for _ in range(workers)]
        self.replaced = 0  # workers that died or were killed, and were replaced
        self._turn = threading.Lock()

    def _start(self) -> _Worker:
        mine, theirs = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(theirs, self.name, self.timeout_s), daemon=True)
        process.start()
        theirs.close()
        return _Worker(process, mine)

    def _replace(self, i: int, why: str) -> None:
        old = self._workers[i]
        old.process.kill()
        old.process.join()
        old.conn.close()
        self.replaced += 1
        print(f"warning: reward worker {old.process.pid} {why}; replaced by a fresh one.", file=sys.stderr,
              flush=True)
        self._workers[i] = self._start()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def score(self, responses: list[str], answers: list[str]) -> Scores:
        with self._turn:
            return self._score(list(zip(responses, answers, strict=True)))

    def _score(self, samples: list[tuple[str, str]]) -> Scores:
        results: list[tuple[float, str, float | None] | None] = [None] * len(samples)
        queue, deaths = deque(range(len(samples))), [0] * len(samples)
        while queue or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.job is None and queue:
                    w.job, w.hard_end = queue.popleft(), time.monotonic() + self.timeout_s + GRACE_S
                    try:
                        w.conn.send(samples[w.job])
                    except OSError:  # it died between two samples; noticed below
                        pass
            busy = [w for w in self._workers if w.job is not None]
            wait([x for w in busy for x in (w.conn, w.process.sentinel)],
                 timeout=max(0.0, min(w.hard_end for w in busy) - time.monotonic()))
            for i, w in enumerate(self._workers):
                if w.job is None:
                    continue
                job = w.job
                try:
                    if w.conn.poll():
                        results[job], w.job = w.conn.recv(), None
                        continue
                except (EOFError, OSError):
                    pass
                if not w.process.is_alive():
                    deaths[job] += 1
                    if deaths[job] < ATTEMPTS:
                        queue.appendleft(job)
                        self._replace(i, f"died ({_how(w.process.exitcode)}) while scoring a sample, which is "
                                         "scored again")
                    else:
                        results[job] = (0.0, "error", None)
                        self._replace(i, f"died ({_how(w.process.exitcode)}) on a sample that killed a worker "
                                         f"before; it counts as a reward error")
                elif time.monotonic() >= w.hard_end:  # deaf to its timer (C code holding the signal)
                    results[job] = (0.0, "timeout", None)
                    self._replace(i, f"did not stop at its {self.timeout_s:g} s limit; killed, the sample counts "
                                     "as a timeout")
        return Scores([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])

    def close(self) -> None:
        for w in self._workers:
            w.conn.close()
            w.process.kill()
            w.process.join()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"signal {signal.Signals(-exitcode).name}"
    return f"exit {exitcode}"

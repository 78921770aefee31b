"""Run metrics: per-phase timers, a timeline of every role's phases, the JSONL file and the other tracking backends
(figures of them: ``flowrl_megatron.plots``)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from flowrl_megatron.files import write_text_atomic

PHASES = ("rollout", "rewards", "logprobs", "update", "sync", "eval", "checkpoint")


class Timeline:
    """What each role (engines, rewards, trainer) did when: intervals in wall-clock seconds, added from any
    thread, drained by the driver into ``RUN_DIR/timeline.jsonl`` once per step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[dict] = []

    def add(self, role: str, phase: str, start: float, end: float) -> None:
        with self._lock:
            self._events.append({"role": role, "phase": phase, "start": start, "end": end})

    @contextlib.contextmanager
    def span(self, role: str, phase: str) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            self.add(role, phase, start, time.time())

    def drain(self) -> list[dict]:
        with self._lock:
            events, self._events = self._events, []
        return events


class PhaseTimer:
    """Wall-clock seconds per phase of a step; what no phase covers is the framework's own "other". With a
    ``timeline``, each phase is also an interval of the trainer's role there."""

    def __init__(self, timeline: Timeline | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()
        self.timeline = timeline

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start, wall = time.perf_counter(), time.time()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
            if self.timeline is not None:
                self.timeline.add("trainer", phase, wall, time.time())

    def breakdown(self) -> dict[str, float]:
        total = time.perf_counter() - self._start
        out = {p: self.seconds.get(p, 0.0) for p in PHASES}
        out["other"] = max(total - sum(out.values()), 0.0)
        out["total"] = total
        return out


def format_breakdown(seconds: dict[str, float]) -> str:
    total = max(seconds["total"], 1e-9)
    rows = [f"  {p:<10} {seconds[p]:9.1f} s {100 * seconds[p] / total:5.1f}%" for p in (*PHASES, "other")]
    return "step-time breakdown:\n" + "\n".join(rows) + f"\n  {'total':<10} {seconds['total']:9.1f} s"


def kept_through(resume_step: int) -> int:
    """The last step whose records a run resumed from ``resume_step``'s checkpoint keeps: a start with no
    checkpoint (0) keeps none, since it redoes everything an earlier attempt logged, its step-0 evaluation too."""
    return resume_step if resume_step else -1


class StepLog:
    """A JSONL file of one record per step (or several): a resumed run redoes the steps after its checkpoint, so
    their old records are dropped first (atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, resume_step: int) -> list[dict]:
        """Drop the records after what the checkpoint covers; the records kept."""
        if not self.path.exists():
            return []
        last = kept_through(resume_step)
        lines = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line]
        keep = [(line, record) for line, record in lines if record["step"] <= last]
        write_text_atomic(self.path, "".join(line + "\n" for line, _ in keep))
        return [record for _, record in keep]

    def append(self, step: int, *records: dict) -> None:
        with self.path.open("a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in records)


class MetricsLog:
    """``metrics.jsonl`` (one object per step), and the same scalars to every other backend of
    ``logging.backends`` (``flowrl_megatron.tracking``). The JSONL file is the record: a resumed run sends each
    backend the steps up to its checkpoint that the backend lacks (W&B's offline writer loses what it had not
    flushed when the run was killed; a backend dropped mid-run, or added to the recipe, catches up)."""

    def __init__(self, cfg, resume_step: int) -> None:
        from flowrl_megatron.tracking import Trackers

        self.jsonl = StepLog(Path(cfg.run_dir) / "metrics.jsonl")
        kept = self.jsonl.truncate_after(resume_step)
        self.trackers = Trackers(cfg, resume_step)
        for record in kept:
            step = record.pop("step")
            self.trackers.log(step, record)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.jsonl.append(step, values)
        self.trackers.log(step, values)

    def close(self) -> None:
        self.trackers.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def read_timeline(run_dir: str | Path, last_steps: int = 0) -> list[dict]:
    """The timeline's intervals (``Timeline``), of the last ``last_steps`` steps only when > 0."""
    path = Path(run_dir) / "timeline.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line]
    if last_steps and events:
        first = max(e["step"] for e in events) - last_steps + 1
        events = [e for e in events if e["step"] >= first]
    return events


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in _union(intervals))


# role -> (its working phases, phases of any role during which it is not working though in one of them)
BUSY = {"engines": (("generate",), ("paused",)),
        "trainer": (("logprobs", "update", "sync", "eval", "checkpoint"), ("pause",))}


def busy_fractions(events: list[dict], start: float, end: float) -> dict[str, float]:
    """Share of ``[start, end]`` each role worked: the engines while requests were in flight and they were not
    paused for a weight update; the trainer in its log-prob, update, sync, eval and checkpoint phases, except while
    it waited for the engines to pause (``weight_update=drain`` waits there for the requests in flight)."""
    out = {}
    for role, (working, waiting) in BUSY.items():
        work = _union([(e["start"], e["end"]) for e in events if e["role"] == role and e["phase"] in working])
        wait = _union([(e["start"], e["end"]) for e in events if e["phase"] in waiting])
        both = [(max(a, c), min(b, d)) for a, b in work for c, d in wait if max(a, c) < min(b, d)]
        out[role] = (_length(work, start, end) - _length(both, start, end)) / max(end - start, 1e-9)
    return out

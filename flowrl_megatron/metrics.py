"""Run metrics: per-phase timers, a JSONL file and tensorboard scalars, PNG curves (``flowrl plot RUN_DIR``)."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from flowrl_megatron.files import write_text_atomic

PHASES = ("rollout", "rewards", "logprobs", "update", "sync", "eval", "checkpoint")


class PhaseTimer:
    """Wall-clock seconds per phase of a step; what no phase covers is the framework's own "other"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

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


class MetricsLog:
    """``metrics.jsonl`` (one object per step) and tensorboard scalars under ``tensorboard/``."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """A resumed run redoes the steps after its checkpoint: drop their old lines (atomically)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


PLOTS = {
    "reward": ["reward/mean", "reward/accuracy"],
    "flowrl": ["train/log_z", "train/residual", "train/residual_std"],
    "policy": ["train/entropy", "train/policy_logprob", "train/ref_logprob"],
    "importance": ["train/importance_weight", "train/importance_weight_max", "train/clip_fraction"],
    "length": ["response/length_mean", "response/truncated_fraction"],
    "mismatch": ["mismatch/abs_diff", "mismatch/prob_ratio"],
    "time": [f"time/{p}" for p in (*PHASES, "other")],
    "eval_pass": [f"eval/pass@{k}" for k in (1, 2, 4, 8, 16, 32, 64)],
    "eval_diversity": ["eval/distinct", "eval/distinct_correct"],
    "eval_kl": ["eval/kl_ref"],
}


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per group of related metrics, in ``RUN_DIR/plots``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, keys in PLOTS.items():
        present = [k for k in keys if any(k in r for r in rows)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in present:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

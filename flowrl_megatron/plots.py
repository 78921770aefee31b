"""PNG figures: a run's curves (``flowrl plot``), runs overlaid (``flowrl compare``), the timeline's Gantt chart.

Every axis says what it shows and in which unit, and carries one quantity (series of different sizes get panels of
their own); an axis whose positive values span more than two decades is logarithmic.
"""

from __future__ import annotations

import math
from pathlib import Path

from flowrl_megatron.errors import UserError
from flowrl_megatron.files import write_text_atomic
from flowrl_megatron.metrics import PHASES, read_metrics, read_timeline

PASS_KS = (1, 2, 4, 8, 16, 32, 64)

# figure -> its panels: (the axis' quantity and unit, the metrics drawn on it)
PLOTS: dict[str, list[tuple[str, list[str]]]] = {
    "reward": [("reward per response (0-1)", ["reward/mean", "reward/accuracy"])],
    "flowrl": [("log Z (nats)", ["train/log_z"]),
               ("residual log Z + log pi - beta r - log pi_ref (nats)", ["train/residual", "train/residual_std"]),
               ("|log Z - the group's best log Z| (nats)", ["train/log_z_gap"])],
    "policy": [("entropy (nats / token)", ["train/entropy"]),
               ("log-prob of the sampled tokens (nats / token)", ["train/policy_logprob", "train/ref_logprob"])],
    "importance": [("importance weight pi / pi_old (ratio)", ["train/importance_weight",
                                                              "train/importance_weight_max"]),
                   ("clipped or masked (fraction)", ["train/clip_fraction", "train/mask_fraction"])],
    "staleness": [("sample age (weight versions)", ["rollout/staleness_mean", "rollout/staleness_max"]),
                  ("groups dropped as stale (count)", ["rollout/dropped_stale"])],
    "length": [("response length (tokens)", ["response/length_mean", "response/length_max"]),
               ("responses cut at the limit (fraction)", ["response/truncated_fraction"])],
    "mismatch": [("|train - rollout| log-prob (nats / token)", ["mismatch/abs_diff", "mismatch/probe_abs_diff"]),
                 ("train / rollout probability (ratio)", ["mismatch/prob_ratio"])],
    "time": [("time per step (s)", [f"time/{p}" for p in (*PHASES, "other", "total")])],
    "eval_pass": [("pass@k (fraction of prompts)", [f"eval/pass@{k}" for k in PASS_KS])],
    "eval_diversity": [("distinct answers among the samples (count per prompt)", ["eval/distinct",
                                                                                  "eval/distinct_correct"])],
    "eval_kl": [("KL(policy || reference) (nats / response)", ["eval/kl_ref"])],
}
UNITS = {key: label for panels in PLOTS.values() for label, keys in panels for key in keys}
COMPARED = ("reward/mean", "reward/accuracy", "response/length_mean", "train/entropy", "train/log_z",
            "eval/pass@1", "eval/distinct_correct", "eval/kl_ref", "time/total")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale(ax, values: list[float]) -> None:
    """Logarithmic when the (all positive) values span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def plot_run(run_dir: str | Path) -> list[Path]:
    """One PNG per group of related metrics, a panel per quantity, in ``RUN_DIR/plots``; the files written."""
    plt = _pyplot()
    rows = read_metrics(run_dir)
    out_dir = Path(run_dir) / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, panels in PLOTS.items():
        panels = [(label, [k for k in keys if any(k in r for r in rows)]) for label, keys in panels]
        panels = [(label, keys) for label, keys in panels if keys]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
        for ax, (label, keys) in zip(axes[0], panels, strict=True):
            drawn = []
            for key in keys:
                points = [(r["step"], r[key]) for r in rows if key in r]
                ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
                drawn += [v for _, v in points]
            _scale(ax, drawn)
            ax.set_xlabel("step")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_ylabel(label, fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"{Path(run_dir).name}: {name}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    timeline = read_timeline(run_dir)
    if timeline:
        written.append(plot_timeline(timeline, out_dir / "timeline.png"))
    return written


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average (tensorboard's smoothing): ``weight`` 0 leaves the values as they are."""
    out, last = [], None
    for v in values:
        last = v if last is None or not math.isfinite(last) else weight * last + (1 - weight) * v
        out.append(last)
    return out


def file_name(metric: str) -> str:
    return metric.replace("/", "_").replace("@", "_at_")


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, with its parent's where names repeat."""
    names = [d.name for d in run_dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in run_dirs]


def final_evaluations(runs: dict[str, list[dict]]) -> str:
    """A markdown table of each run's last evaluation (the ``eval/`` metrics of its last row that has them)."""
    finals = {name: next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), None)
              for name, rows in runs.items()}
    keys = sorted({k for r in finals.values() if r for k in r if k.startswith("eval/")},
                  key=lambda k: (not k.startswith("eval/pass@"), int(k.rsplit("@", 1)[1]) if "@" in k else 0, k))
    if not keys:
        return "no run has an evaluation (eval.every).\n"
    lines = ["| run | step | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for name, r in finals.items():
        cells = [f"{r[k]:.4g}" if r and k in r else "-" for k in keys]
        lines.append(f"| {name} | {r['step'] if r else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_runs(run_dirs: list[Path], out: Path, metrics: list[str] | None = None, smoothing: float = 0.0,
                 x: str = "step") -> list[Path]:
    """One PNG per metric with the runs overlaid, and ``compare.md`` (each run's final evaluation), in ``out``.

    ``x``: ``step``, or ``time`` (minutes of training: the steps' summed ``time/total``)."""
    for d in run_dirs:
        if not (d / "metrics.jsonl").is_file():
            raise UserError(f"{d} has no metrics.jsonl; pass run directories of training runs.")
    runs = dict(zip(run_labels(run_dirs), (read_metrics(d) for d in run_dirs), strict=True))
    present = {k for rows in runs.values() for r in rows for k in r}
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise UserError(f"no run has {', '.join(missing)}; metrics they have include "
                            f"{', '.join(sorted(present - {'step'})[:12])}.")
    else:
        metrics = [m for m in COMPARED if m in present]
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        drawn = []
        for name, rows in runs.items():
            elapsed, points = 0.0, []
            for r in rows:
                elapsed += r.get("time/total", 0.0) / 60
                if metric in r:
                    points.append((r["step"] if x == "step" else elapsed, r[metric]))
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, _smooth(list(ys), smoothing), label=name, marker="." if len(points) < 30 else None)
                drawn += ys
        _scale(ax, drawn)
        ax.set_xlabel("step" if x == "step" else "training time (min)")
        if x == "step":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(UNITS.get(metric, metric), fontsize=8)
        ax.set_title(metric + (f" (smoothed {smoothing:g})" if smoothing else ""), fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{file_name(metric)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    written.append(write_text_atomic(out / "compare.md", "# final evaluation\n\n" + final_evaluations(runs)))
    return written


PHASE_COLORS = {"generate": "tab:blue", "paused": "lightgray", "pause": "gray", "rewards": "tab:green",
                "rollout": "whitesmoke", "logprobs": "tab:orange", "update": "tab:red", "sync": "tab:purple",
                "eval": "tab:olive", "checkpoint": "tab:brown"}


def plot_timeline(events: list[dict], path: Path, last_steps: int = 8) -> Path:
    """A Gantt chart of what each role did over the last ``last_steps`` steps (the trainer's "rollout" is waiting
    for rollouts)."""
    plt = _pyplot()
    first = max(max(e["step"] for e in events) - last_steps + 1, min(e["step"] for e in events))
    events = [e for e in events if e["step"] >= first]
    t0 = min(e["start"] for e in events)
    roles = ["engines", "rewards", "trainer"]
    fig, ax = plt.subplots(figsize=(10, 2.8))
    seen = set()
    for e in events:
        y = roles.index(e["role"])
        label = None if e["phase"] in seen else e["phase"]
        seen.add(e["phase"])
        ax.barh(y, e["end"] - e["start"], left=e["start"] - t0, height=0.6 if e["phase"] != "paused" else 0.3,
                color=PHASE_COLORS.get(e["phase"], "black"), edgecolor="none", label=label)
    ax.set_yticks(range(len(roles)), roles)
    ax.set_ylabel("role")
    ax.set_xlabel("time since the first step shown (s)")
    ax.set_title(f"timeline of steps {first}-{max(e['step'] for e in events)} (trainer 'rollout': waiting)")
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

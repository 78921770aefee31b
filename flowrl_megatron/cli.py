"""The ``flowrl`` command: train, plot, demo."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from flowrl_megatron.errors import UserError, run_cli

TRAIN_HELP = """\
Train with FlowRL (or GRPO / REINFORCE++, algorithm.name=...) from a YAML recipe.

Every setting can be overridden as section.key=value, e.g.
  flowrl train recipes/tiny_cpu.yaml train.steps=20 algorithm.name=grpo run_dir=runs/grpo
Sections: model (path, megatron_checkpoint, tp, pp, dtype), data (train_files, prompt_key, answer_key,
template, max_prompt_tokens, shuffle), reward (name, workers, timeout_s), rollout (engines, engine_tp, n,
max_response_tokens, temperature, top_p, max_concurrency, bucket_mib, max_mismatch), algorithm (name, beta,
importance_weight, clip_eps, weight_cap, reward_normalization, kl_coef), z_head (variant, dropout,
detach_input, lr_mult, init_seed), train (steps, prompts_per_step, mini_batch_prompts, epochs,
micro_batch_size, lr, weight_decay, warmup_steps, grad_clip, seed), checkpoint (every, keep), and
run_dir, dp. The whole configuration is checked before anything starts; the resolved one is written to
RUN_DIR/config.yaml. A run directory with a checkpoint resumes from its latest one.

Starts torchrun with model.tp x model.pp x dp processes on this machine (gloo on CPU, NCCL on GPU);
rank 0 also starts the vLLM engines and the reward workers.
"""


def train(args: argparse.Namespace) -> int:
    from flowrl_megatron.config import load_config
    from flowrl_megatron.runtime.distributed import free_port
    from flowrl_megatron.trainer import write_run_config

    cfg = load_config(args.recipe, args.overrides)
    config_path = write_run_config(cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.world_size}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "flowrl_megatron.trainer",
           str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.metrics import plot_run

    if not Path(args.run_dir, "metrics.jsonl").is_file():
        raise UserError(f"{args.run_dir} has no metrics.jsonl; pass the run_dir of a training run.")
    for path in plot_run(args.run_dir):
        print(path)
    return 0


def make_tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flowrl_megatron.models.tiny import make_tiny_qwen2
    from flowrl_megatron.rewards.synthetic import write_answer_set_dataset

    root = Path(args.dir)
    if (root / "model").exists():
        raise UserError(f"{root / 'model'} already exists; choose another directory or remove it.")
    make_tiny_qwen2(root / "model", seed=args.seed)
    write_answer_set_dataset(root / "train.jsonl", seed=args.seed)
    print(f"wrote {root / 'model'} and {root / 'train.jsonl'}; now: flowrl train recipes/tiny_cpu.yaml")
    return 0


def demo(args: argparse.Namespace) -> int:
    print("flowrl demo: not yet implemented. Train with `flowrl train RECIPE` (see `flowrl train --help`); "
          "the FlowRL vs GRPO diversity demo is the next piece of work.", file=sys.stderr)
    return 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flowrl", description="FlowRL post-training on Megatron-core with vLLM "
                                     "rollouts. Checkpoint conversion: python -m checkpoints_tools.hf_to_megatron / "
                                     "megatron_to_hf.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a recipe", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="section.key=value settings that replace the recipe's")
    p.set_defaults(func=train)
    p = sub.add_parser("plot", help="write PNG training curves of a run into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=plot)
    p = sub.add_parser("make-tiny", help="write a random tiny Qwen2 and a synthetic dataset for recipes/tiny_cpu.yaml")
    p.add_argument("dir", nargs="?", default="runs/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_tiny)
    p = sub.add_parser("demo", help="tiny end-to-end FlowRL vs GRPO run on CPU (not yet implemented)")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    code = 0

    def run() -> None:
        nonlocal code
        code = args.func(args)

    run_cli(run)
    sys.exit(code)

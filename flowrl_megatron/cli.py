"""The ``flowrl`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="flowrl",
        description="FlowRL post-training on Megatron-core with vLLM rollouts. "
        "Checkpoint conversion: python -m checkpoints_tools.hf_to_megatron / megatron_to_hf.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="tiny end-to-end FlowRL vs GRPO run on CPU (arrives with the trainer)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        print(
            "flowrl demo: not yet implemented. The end-to-end FlowRL vs GRPO demo needs the trainer, "
            "which is not built yet; today the project provides the CPU runtime, the Megatron model "
            "builder, checkpoint conversion, the FlowRL/GRPO/REINFORCE++ objectives with a toy "
            "distribution-matching proof (bench/toy_distribution_matching.py) and vLLM rollout engines "
            "(see README.md).",
            file=sys.stderr,
        )
        sys.exit(3)

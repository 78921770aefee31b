"""python -m checkpoints_tools.hf_to_megatron --input HF_DIR --output CKPT_DIR --tp N --pp M"""

from __future__ import annotations

import argparse

from flowrl_megatron.conversion.convert import DTYPES, hf_to_megatron
from flowrl_megatron.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.hf_to_megatron",
        description=(
            "Convert a Hugging Face safetensors model (Qwen2/Qwen2.5, Llama) into a megatron-core "
            "torch_dist checkpoint laid out for TP x PP. Streams one tensor at a time and needs no GPU. "
            "The output also holds the source config and tokenizer files (hf/), so megatron_to_hf needs "
            "nothing else. It is written to a temporary directory and renamed only when complete."
        ),
    )
    p.add_argument("--input", required=True, help="Hugging Face model directory (config.json + safetensors).")
    p.add_argument("--output", required=True, help="new or empty directory for the Megatron checkpoint.")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size the chunks are laid out for (default 1).")
    p.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size, checked against the layer count (default 1)."
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype (default: the source's).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = hf_to_megatron(args.input, args.output, tp=args.tp, pp=args.pp, dtype=args.dtype)
    print(f"wrote Megatron checkpoint (tp={args.tp}, pp={args.pp}) to {out}")


if __name__ == "__main__":
    run_cli(main)

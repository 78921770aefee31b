"""python -m checkpoints_tools.megatron_to_hf --input CKPT_DIR --output HF_DIR"""

from __future__ import annotations

import argparse

from flowrl_megatron.conversion.convert import megatron_to_hf
from flowrl_megatron.errors import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_tools.megatron_to_hf",
        description=(
            "Convert a megatron-core torch_dist checkpoint saved at any TP/PP into a Hugging Face "
            "safetensors model loadable by transformers and vLLM: vocabulary unpadded, fused QKV and "
            "gate/up split, tied embeddings respected. The Z head and optimizer state are dropped. "
            "Streams one layer at a time and needs no GPU."
        ),
    )
    p.add_argument("--input", required=True, help="Megatron checkpoint directory (holds metadata.json).")
    p.add_argument("--output", required=True, help="new or empty directory for the Hugging Face model.")
    p.add_argument(
        "--hf-config",
        help="directory with the original config.json and tokenizer files "
        "(default: INPUT/hf, written by hf_to_megatron).",
    )
    p.add_argument(
        "--max-shard-size-mb",
        type=int,
        default=2048,
        help="start a new safetensors shard above this size; an index.json is written when there is more than one.",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = megatron_to_hf(args.input, args.output, args.hf_config, max_shard_bytes=args.max_shard_size_mb * 1024**2)
    print(f"wrote Hugging Face model to {out}")


if __name__ == "__main__":
    run_cli(main)

"""Megatron-vs-transformers logits parity on a GPU (CUDA + NCCL), float32 and bf16.

The lent GPU machine has torch but neither transformers nor vLLM, so the reference is made
here and carried:

    # here (CPU): tiny Qwen2 -> Megatron checkpoint + transformers' float32 logits
    python bench/gpu/logits_parity.py prepare --out .gpu_artifacts
    # there (carry .gpu_artifacts and .whl with megatron-core 0.19.2 cp312):
    python bench/gpu/logits_parity.py run --artifacts .gpu_artifacts --json $OUT/parity.json

``run`` also works on CPU (gloo): the same code path with the other device and backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

TOKENS = [[5, 17, 99, 3, 250, 999, 42, 7, 0, 12, 500, 64, 8, 9, 10, 11], list(range(1, 17))]


def prepare(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from flowrl_megatron.conversion.convert import hf_to_megatron
    from flowrl_megatron.models.tiny import make_tiny_model

    src = make_tiny_model(out / "hf", seed=1)
    hf_to_megatron(src, out / "ckpt", tp=1, pp=1)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        torch.save(model(torch.tensor(TOKENS)).logits, out / "hf_logits.pt")


def run(artifacts: Path, json_out: Path | None) -> dict:
    import megatron.core

    from tests.models.workers import megatron_logits

    os.environ.setdefault("LOCAL_RANK", "0")
    want = torch.load(artifacts / "hf_logits.pt", weights_only=True)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "logit_abs_max": want.abs().max().item(),
    }
    for dtype in ("float32", "bfloat16"):
        out = artifacts / f"megatron_{dtype}.pt"
        megatron_logits(str(artifacts / "ckpt"), 1, 1, TOKENS, str(out), dtype=dtype)
        diff = (torch.load(out, weights_only=True) - want).abs()
        report[dtype] = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    print(json.dumps(report, indent=2))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare").add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--artifacts", type=Path, required=True)
    r.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    else:
        run(args.artifacts, args.json)


if __name__ == "__main__":
    main()

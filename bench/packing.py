"""Padding and step time of a FlowRL update: fixed-size padded micro-batches vs token-budget ones vs packed (THD).

One rollout batch with a realistic RL length mix is cut three ways and each way runs the same FlowRL
forward/backward (the same attention for all three, so only the batching differs), alternated and repeated:

- fixed:  ``micro_batch_size`` samples per micro-batch in arrival order, each padded to its longest sample
- budget: as many samples as fit ``--budget`` tokens (rows x longest row), longest first
- packed: samples end to end in one row up to ``--budget`` tokens, no padding (when the attention takes packed
  rows: ``--attention sdpa``, or ``default`` with transformer-engine on a GPU)

Lengths: prompts uniform in [--prompt-min, --prompt-max]; responses log-normal (median --response-median,
sigma --response-sigma) cut at --max-response, which the longest reasoning samples hit, as in RL on math. The
defaults are a 1/8 scale of a 4k-token setting so a CPU run takes about a minute; the padding fractions do not
depend on the scale. Ratios are measured in one run; absolute CPU times mean nothing.

    python bench/packing.py [--samples 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rl_lengths(args) -> list[tuple[int, int]]:
    rng = random.Random(args.seed)
    return [(rng.randint(args.prompt_min, args.prompt_max),
             max(1, min(int(rng.lognormvariate(0, args.response_sigma) * args.response_median), args.max_response)))
            for _ in range(args.samples)]


def rollout_batch(lengths: list[tuple[int, int]], vocab: int):
    from flowrl_megatron.training.batch import Batch

    width = max(p + r for p, r in lengths)
    g = torch.Generator().manual_seed(0)
    n = len(lengths)
    tokens = torch.zeros(n, width, dtype=torch.long)
    prompt_mask = torch.zeros(n, width, dtype=torch.bool)
    response_mask = torch.zeros_like(prompt_mask)
    for i, (p, r) in enumerate(lengths):
        tokens[i, : p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        prompt_mask[i, :p] = True
        response_mask[i, p : p + r] = True
    return Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask,
                 old_logprobs=torch.full((n, width), -8.0), ref_logprobs=torch.full((n, width), -8.0),
                 advantages=torch.randn(n, generator=g))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="samples in the rollout batch (one DP rank's share)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="samples per fixed-size micro-batch")
    p.add_argument("--budget", type=int, default=0, help="tokens per budget/packed micro-batch "
                   "(default: micro-batch-size x the longest possible sample, the fixed layout's worst case)")
    p.add_argument("--prompt-min", type=int, default=16)
    p.add_argument("--prompt-max", type=int, default=64)
    p.add_argument("--response-median", type=int, default=96)
    p.add_argument("--response-sigma", type=float, default=0.8)
    p.add_argument("--max-response", type=int, default=448)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", choices=["sdpa", "default"], default="sdpa",
                   help="model.attention (default: transformer-engine where usable, else megatron-core's local)")
    args = p.parse_args()

    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.models.arch import ModelArch
    from flowrl_megatron.models.gpt import build_gpt_model, takes_packed_sequences
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.micro_batches import MicroBatching, micro_batches, padding_fraction
    from flowrl_megatron.training.parallel import wrap_ddp
    from flowrl_megatron.training.step import forward_backward

    init_model_parallel(ParallelLayout())
    longest = args.prompt_max + args.max_response
    arch = ModelArch("Qwen2ForCausalLM", vocab_size=4096, hidden_size=256, ffn_hidden_size=1024, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                     tie_embeddings=False, max_position_embeddings=longest)
    ddp = wrap_ddp(build_gpt_model(arch, z_head=ZHeadConfig(), calculate_per_token_loss=True,
                                   attention=args.attention))
    lengths = rl_lengths(args)
    batch = rollout_batch(lengths, arch.vocab_size)
    budget = args.budget or args.micro_batch_size * longest
    ways = {"fixed": MicroBatching(micro_batch_size=args.micro_batch_size),
            "budget": MicroBatching(max_tokens=budget)}
    if takes_packed_sequences(args.attention):
        ways["packed"] = MicroBatching(max_tokens=budget, packed=True)
    responses = sorted(r for _, r in lengths)
    print(f"{args.samples} samples, {sum(p + r for p, r in lengths)} tokens; response median "
          f"{statistics.median(responses):.0f}, max {responses[-1]} ({sum(r == args.max_response for r in responses)} "
          f"at the {args.max_response} cap); budget {budget} tokens per micro-batch")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for i in range(args.repeats + 1):
        order = list(ways.items())
        for name, batching in order if i % 2 else order[::-1]:  # alternate the order: machine drift cancels
            ddp.zero_grad_buffer()
            start = time.perf_counter()
            forward_backward([ddp], batch, AlgorithmConfig(), batching=batching, vocab_size=arch.vocab_size)
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    fixed = statistics.median(times["fixed"])
    print(f"{'layout':8s} {'micro-batches':>13s} {'padding':>8s} {'step s':>8s} {'vs fixed':>9s}")
    for name, batching in ways.items():
        cut = micro_batches(batch, batching)
        t = statistics.median(times[name])
        print(f"{name:8s} {len(cut):13d} {padding_fraction(cut):8.1%} {t:8.2f} {t / fixed:9.2f}")


if __name__ == "__main__":
    main()

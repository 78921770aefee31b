"""Cost of the FlowRL objective, measured as ratios in one run (absolute CPU times mean nothing).

1. Step time: a FlowRL update (vocab-parallel log-probs + Z head + trajectory-balance loss)
   against a plain next-token cross-entropy step (GPTModel's own fused ``labels=`` loss) on the
   same model and tokens, both through megatron-core's schedule, alternated and repeated.
   Target: ratio <= 1.10.
2. Memory: peak memory of per-token log-probs + entropy (forward and backward) from bf16 logits
   of a 152k vocabulary with the chunked vocab-parallel function, against materialising full
   float32 logits and a log-softmax. Each runs in a fresh process that resets the kernel's
   peak-RSS mark after set-up.

    python bench/flowrl_overhead.py [--repeats 5] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB = 152064


def _qwen25_1_5b():
    from flowrl_megatron.models.arch import ModelArch

    return ModelArch("Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, ffn_hidden_size=8960, num_layers=28,
                     num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                     tie_embeddings=True, max_position_embeddings=4096)


QWEN25_1_5B = _qwen25_1_5b()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_probe(mode: str, tokens: int) -> None:
    """Peak RSS rise of one log-prob forward+backward on [tokens, VOCAB] bf16 logits."""
    from flowrl_megatron.algorithms.logprobs import vocab_parallel_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, VOCAB, generator=g).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, VOCAB, (tokens,), generator=g)
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_kb("VmRSS")
    if mode == "chunked":
        lp, ent = vocab_parallel_logprobs(logits, target, vocab_size=VOCAB)
    else:
        logp = torch.log_softmax(logits.float(), dim=-1)
        lp = logp.gather(-1, target[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
    (lp.sum() + ent.sum()).backward()
    print(json.dumps({"peak_rise": (_status_kb("VmHWM") - start) * 1024, "logits_bytes": logits.numel() * 2}))


def measure_memory(tokens: int) -> dict[str, int]:
    out = {}
    for mode in ("chunked", "full"):
        res = subprocess.run([sys.executable, __file__, "--memory-probe", mode, "--tokens", str(tokens)],
                             cwd=REPO, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def output_layer_share(arch) -> float:
    h, d = arch.hidden_size, arch.head_dim
    per_layer = h * (arch.num_heads + 2 * arch.num_kv_heads) * d + arch.num_heads * d * h + 3 * h * arch.ffn_hidden_size
    head = h * arch.padded_vocab_size
    return head / (head + arch.num_layers * per_layer)


def step_times(repeats: int, seq_len: int, batch: int) -> dict[str, list[float]]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.models.arch import ModelArch
    from flowrl_megatron.models.gpt import build_gpt_model, causal_attention_mask
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.batch import Batch
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.parallel import wrap_ddp
    from flowrl_megatron.training.step import forward_backward

    init_model_parallel(ParallelLayout())
    # Proportioned like Qwen2.5-1.5B, where the output layer is ~15% of the forward matmul FLOPs.
    arch = ModelArch("Qwen2ForCausalLM", vocab_size=16384, hidden_size=512, ffn_hidden_size=2816, num_layers=8,
                     num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                     tie_embeddings=False, max_position_embeddings=seq_len)
    print(f"output layer share of forward matmul FLOPs: {output_layer_share(arch):.0%} (Qwen2.5-1.5B: "
          f"{output_layer_share(QWEN25_1_5B):.0%})")
    model = build_gpt_model(arch, z_head=ZHeadConfig(), calculate_per_token_loss=True)
    ddp = wrap_ddp(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (batch, seq_len), generator=g)
    prompt = seq_len // 4
    prompt_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    prompt_mask[:, :prompt] = True
    batch_dict = Batch(
        tokens=tokens, prompt_mask=prompt_mask, response_mask=~prompt_mask,
        old_logprobs=torch.full((batch, seq_len), -9.7), ref_logprobs=torch.full((batch, seq_len), -9.7),
        advantages=torch.randn(batch, generator=g),
    )
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    loss_mask = (~prompt_mask).float()

    def ce_step(data_iterator, m):
        ids = next(data_iterator)
        out = m(input_ids=ids, position_ids=torch.arange(seq_len).expand_as(ids),
                attention_mask=causal_attention_mask(seq_len), labels=labels)

        def loss(per_token):
            return (per_token * loss_mask).sum(), loss_mask.sum().to(torch.int), {}

        return out, loss

    def flowrl() -> None:
        forward_backward([ddp], batch_dict, AlgorithmConfig(), batching=MicroBatching(batch),
                         vocab_size=arch.vocab_size)

    def plain() -> None:
        get_forward_backward_func()(forward_step_func=ce_step, data_iterator=iter([tokens]), model=[ddp],
                                    num_microbatches=1, seq_length=seq_len, micro_batch_size=batch)

    times: dict[str, list[float]] = {"flowrl": [], "plain": []}
    for i in range(repeats + 1):
        order = (("flowrl", flowrl), ("plain", plain))
        for name, fn in order if i % 2 else order[::-1]:  # alternate which runs first
            ddp.zero_grad_buffer()
            start = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024, help="tokens for the memory comparison")
    p.add_argument("--memory-probe", choices=["chunked", "full"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.tokens)
        return
    times = step_times(args.repeats, args.seq_len, args.batch)
    f, c = statistics.median(times["flowrl"]), statistics.median(times["plain"])
    ratio = statistics.median(a / b for a, b in zip(times["flowrl"], times["plain"], strict=True))
    print(f"step time ({args.repeats} adjacent pairs, {args.batch}x{args.seq_len} tokens, CPU): FlowRL {f:.3f}s, "
          f"plain cross-entropy {c:.3f}s; median per-pair ratio {ratio:.3f} (target <= 1.10)")
    mem = measure_memory(args.tokens)
    ch, full = mem["chunked"]["peak_rise"], mem["full"]["peak_rise"]
    print(f"log-prob peak memory for {args.tokens} tokens x {VOCAB} vocab (bf16 logits = "
          f"{mem['full']['logits_bytes'] / 2**20:.0f} MiB): chunked {ch / 2**20:.0f} MiB, "
          f"full float32 {full / 2**20:.0f} MiB, ratio {ch / full:.3f}")


if __name__ == "__main__":
    main()

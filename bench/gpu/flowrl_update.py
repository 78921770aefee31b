"""FlowRL update throughput on one GPU, for a Qwen2.5-1.5B-shaped model with random weights in bf16.

Measured in one run, per attention backend (megatron-core's default and ``model.attention=sdpa``):
- the bf16 matrix-multiply rate of this GPU (8192^3 matmuls), the reference for MFU;
- a FlowRL update (reference and old log-probs given, Z head, trajectory-balance loss, step of megatron-core's
  distributed optimizer, or the plain one with --no-distributed-optimizer): tokens/s
  and MFU = model FLOPs per second / the measured matmul rate;
- a plain next-token cross-entropy update on the same tokens (GPTModel's own loss): tokens/s, and the
  FlowRL / plain time ratio (target <= 1.10);
- the reference model's log-prob forward: tokens/s.
Model FLOPs per token: 6 x (matmul parameters, the output layer included) + 6 x layers x seq x heads x head_dim
(causal attention, forward and backward); recomputation is not counted.

    python bench/gpu/flowrl_update.py --json $OUT/flowrl_update.json        # on the GPU machine
    python bench/gpu/flowrl_update.py --small                               # the same code at toy size, on CPU

The GPU machine needs only torch and megatron-core (carry its wheel; see /work/.library/device/README.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def qwen25_1_5b(seq_len: int, small: bool):
    from flowrl_megatron.models.arch import ModelArch

    if small:
        return ModelArch("Qwen2ForCausalLM", vocab_size=4096, hidden_size=256, ffn_hidden_size=704, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                         tie_embeddings=True, max_position_embeddings=seq_len)
    return ModelArch("Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, ffn_hidden_size=8960, num_layers=28,
                     num_heads=12, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                     tie_embeddings=True, max_position_embeddings=seq_len)


def flops_per_token(arch, seq_len: int) -> float:
    from flowrl_megatron.planner import layer_params

    matmul = arch.num_layers * (layer_params(arch) - 2 * arch.hidden_size) + arch.padded_vocab_size * arch.hidden_size
    return 6 * matmul + 6 * arch.num_layers * seq_len * arch.num_heads * arch.head_dim


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(size: int, repeats: int = 20) -> float:
    from flowrl_megatron.runtime import device

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    a = torch.randn(size, size, device=device(), dtype=dtype)
    b = torch.randn(size, size, device=device(), dtype=dtype)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def timed(fn, steps: int) -> float:
    """Median seconds of ``fn`` over ``steps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(attention: str, args, peak_tflops: float) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.models.gpt import build_gpt_model, causal_attention_mask
    from flowrl_megatron.runtime import device
    from flowrl_megatron.training.batch import Batch
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.parallel import build_optimizer, wrap_ddp
    from flowrl_megatron.training.step import forward_backward, forward_logprobs

    arch = qwen25_1_5b(args.seq_len, args.small)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    bf16 = dtype == torch.bfloat16
    policy = build_gpt_model(arch, dtype, z_head=ZHeadConfig(), calculate_per_token_loss=True,
                             recompute=args.recompute, attention=attention)
    reference = build_gpt_model(arch, dtype, calculate_per_token_loss=True, attention=attention)
    ddp = wrap_ddp(policy, use_distributed_optimizer=args.distributed_optimizer)
    optimizer = build_optimizer([ddp], lr=1e-6, bf16=bf16, use_distributed_optimizer=args.distributed_optimizer)
    b, s = args.micro_batch, args.seq_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (b, s), generator=g).to(device())
    prompt_mask = torch.zeros(b, s, dtype=torch.bool, device=device())
    prompt_mask[:, : s // 8] = True
    batch = Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=~prompt_mask,
                  advantages=torch.randn(b, generator=g).to(device()))
    kw = dict(batching=MicroBatching(b), vocab_size=arch.vocab_size)
    batch.ref_logprobs = forward_logprobs([reference], batch, **kw)
    batch.old_logprobs = batch.ref_logprobs.clone()
    labels = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)
    loss_mask = (~prompt_mask).float()

    def ce_step(data_iterator, model):
        ids = next(data_iterator)
        out = model(input_ids=ids, position_ids=torch.arange(s, device=ids.device).expand_as(ids),
                    attention_mask=causal_attention_mask(s, ids.device), labels=labels)
        return out, lambda per_token: ((per_token * loss_mask).sum(), loss_mask.sum().to(torch.int), {})

    def flowrl() -> None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward([ddp], batch, AlgorithmConfig(), **kw)
        optimizer.step()

    def plain() -> None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=ce_step, data_iterator=iter([tokens]), model=[ddp],
                                    num_microbatches=1, seq_length=s, micro_batch_size=b)
        optimizer.step()

    t_flowrl, t_plain = timed(flowrl, args.steps), timed(plain, args.steps)
    t_ref = timed(lambda: forward_logprobs([reference], batch, **kw), args.steps)
    tok = b * s
    model_tflops = flops_per_token(arch, s) * tok / 1e12
    out = {"attention": attention, "flowrl_tokens_per_s": tok / t_flowrl, "plain_tokens_per_s": tok / t_plain,
           "flowrl_mfu": model_tflops / t_flowrl / peak_tflops, "plain_mfu": model_tflops / t_plain / peak_tflops,
           "flowrl_over_plain": t_flowrl / t_plain, "reference_forward_tokens_per_s": tok / t_ref}
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def measure_fresh(attention: str, args, peak_tflops: float) -> dict:
    """``measure`` with the previous backend's models freed and the peak-memory mark reset."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return measure(attention, args, peak_tflops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--attention", nargs="+", default=["default", "sdpa"])
    p.add_argument("--recompute", action="store_true", help="full activation recompute")
    p.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction, default=True,
                   help="megatron-core's distributed optimizer (fp32 main weights beside bf16 ones)")
    p.add_argument("--small", action="store_true", help="a toy size for a CPU smoke run")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.small:
        args.seq_len, args.steps = min(args.seq_len, 256), min(args.steps, 2)
    import megatron.core

    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout())
    peak = matmul_tflops(512 if args.small else 8192)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "megatron_core": megatron.core.__version__,
              "seq_len": args.seq_len, "micro_batch": args.micro_batch, "recompute": args.recompute,
              "distributed_optimizer": args.distributed_optimizer,
              "matmul_tflops": peak, "results": [measure_fresh(a, args, peak) for a in args.attention]}
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

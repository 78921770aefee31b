"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

import torch


def reference_logprobs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int, temperature: float):
    """Float64 full-softmax log-probs and entropy over the unpadded vocabulary."""
    z = logits[..., :vocab_size].double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def random_problem(seed: int = 0, shape=(3, 7), padded_vocab: int = 64, vocab_size: int = 57):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, padded_vocab, generator=g) * 3
    target = torch.randint(0, vocab_size, shape, generator=g)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return logits, target, g_lp, g_h


def compare_with_reference(tp: int = 1, chunk_tokens: int = 4, temperature: float = 0.7) -> dict:
    """This rank's vocab slice through vocab_parallel_logprobs vs the float64 reference on the full vocab."""
    from flowrl_megatron.algorithms.logprobs import vocab_parallel_logprobs

    group, rank = None, 0
    if tp > 1:
        import torch.distributed as dist

        from flowrl_megatron.runtime import init_distributed

        init_distributed()
        group, rank = dist.group.WORLD, dist.get_rank()
    logits, target, g_lp, g_h = random_problem()
    vocab_size = 57
    width = logits.shape[-1] // tp
    local = logits[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs(local, target, vocab_start=rank * width, vocab_size=vocab_size,
                                    temperature=temperature, chunk_tokens=chunk_tokens, group=group)
    (lp * g_lp + h * g_h).sum().backward()

    full = logits.double().requires_grad_(True)
    ref_lp, ref_h = reference_logprobs(full, target, vocab_size, temperature)
    (ref_lp * g_lp.double() + ref_h * g_h.double()).sum().backward()
    ref_grad = full.grad[..., rank * width : (rank + 1) * width]
    return {
        "logprob": (lp.double() - ref_lp).abs().max().item(),
        "entropy": (h.double() - ref_h).abs().max().item(),
        "grad": (local.grad.double() - ref_grad).abs().max().item(),
        "grad_scale": ref_grad.abs().max().item(),
        "padded_grad_zero": bool((local.grad[..., max(vocab_size - rank * width, 0):] == 0).all()),
    }

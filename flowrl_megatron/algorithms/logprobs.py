"""Per-token log-probabilities and entropy from vocab-parallel logits, never gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The softmax
statistics (max, sum of exponentials, the target's logit, the expected logit) are reduced
across the TP group, so every rank ends with the same per-token values.

Memory: the work runs over chunks of ``chunk_tokens`` tokens, so the extra float32 memory
is one chunk x vocab-slice at a time, not a float32 copy of all logits. Backward saves
only two floats per token and recomputes the softmax chunk by chunk. Padded vocabulary
rows (ids >= ``vocab_size``) are excluded, as they are for the unpadded model vLLM serves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_TOKENS = 1024


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_stats(logits: torch.Tensor, vocab_start: int, vocab_size: int, temperature: float, group):
    """Float32 scaled logits with padded ids masked, plus the global max and log-sum-exp per token."""
    z = logits.float() / temperature
    local_valid = vocab_size - vocab_start
    if local_valid < z.shape[-1]:
        z[..., max(local_valid, 0) :] = float("-inf")
    m = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
    e = (z - m.unsqueeze(-1)).exp()
    log_sum = _all_reduce(e.sum(dim=-1), dist.ReduceOp.SUM, group).log()
    return z, m, log_sum


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, temperature, chunk_tokens, group):
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        n, v_local = flat.shape
        logprob = torch.empty(n, dtype=torch.float32, device=flat.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)  # max + log-sum-exp: log p = z - lse
        for s in range(0, n, chunk_tokens):
            z, m, log_sum = _chunk_stats(flat[s : s + chunk_tokens], vocab_start, vocab_size, temperature, group)
            chunk_lse = m + log_sum
            local = tgt[s : s + chunk_tokens] - vocab_start
            owned = (local >= 0) & (local < v_local)
            t_logit = z.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1) * owned
            t_logit = _all_reduce(t_logit, dist.ReduceOp.SUM, group)
            p = (z - chunk_lse.unsqueeze(-1)).exp()
            expected_z = _all_reduce((p * z.nan_to_num(neginf=0.0)).sum(-1), dist.ReduceOp.SUM, group)
            logprob[s : s + chunk_tokens] = t_logit - chunk_lse
            entropy[s : s + chunk_tokens] = chunk_lse - expected_z
            lse[s : s + chunk_tokens] = chunk_lse
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.args = (vocab_start, vocab_size, temperature, chunk_tokens)
        return logprob.view(target.shape), entropy.view(target.shape)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, target, lse, entropy = ctx.saved_tensors
        vocab_start, vocab_size, temperature, chunk_tokens = ctx.args
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        g_lp = grad_logprob.reshape(-1).float()
        g_h = grad_entropy.reshape(-1).float()
        grad = torch.empty_like(flat)
        n, v_local = flat.shape
        for s in range(0, n, chunk_tokens):
            sl = slice(s, s + chunk_tokens)
            z = flat[sl].float() / temperature
            local_valid = vocab_size - vocab_start
            if local_valid < v_local:
                z[..., max(local_valid, 0) :] = float("-inf")
            logp = z - lse[sl].unsqueeze(-1)
            p = logp.exp()
            # d log p_t / dz = onehot_t - p ;  d H / dz = -p * (log p + H)
            logp_or_zero = logp.nan_to_num(neginf=0.0)  # masked ids have p = 0; avoid 0 * -inf
            dz = -p * (g_lp[sl].unsqueeze(-1) + g_h[sl].unsqueeze(-1) * (logp_or_zero + entropy[sl].unsqueeze(-1)))
            local = tgt[sl] - vocab_start
            owned = (local >= 0) & (local < v_local)
            rows = torch.nonzero(owned).squeeze(-1)
            dz[rows, local[rows]] += g_lp[sl][rows]
            grad[sl] = (dz / temperature).to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target`` and entropy of the softmax at every position, in float32.

    ``logits``: [..., V_local], this rank's vocabulary slice starting at ``vocab_start``.
    ``target``: [...] token ids in the global vocabulary. ``vocab_size``: the unpadded size.
    ``group``: the tensor-parallel group (None for an unsplit vocabulary).
    """
    if vocab_size is None:
        vocab_size = vocab_start + logits.shape[-1]
    return _VocabParallelLogProbs.apply(logits, target, vocab_start, vocab_size, temperature, chunk_tokens, group)


def megatron_logprobs(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vocab_parallel_logprobs`` for the logits of a Megatron model in the current TP group."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    return vocab_parallel_logprobs(
        logits, target, vocab_start=rank * logits.shape[-1], vocab_size=vocab_size, temperature=temperature,
        chunk_tokens=chunk_tokens, group=parallel_state.get_tensor_model_parallel_group(),
    )

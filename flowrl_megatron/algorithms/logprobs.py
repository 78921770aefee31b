"""Per-token log-probabilities and entropy from vocab-parallel logits, never gathering the vocabulary.

Each TP rank holds logits for a contiguous slice of the (padded) vocabulary. The softmax
statistics (max, sum of exponentials, the target's logit, the expected logit) are reduced
across the TP group, so every rank ends with the same per-token values.

Memory: the work runs over chunks of tokens sized so that one float32 chunk of this rank's
vocabulary slice takes about ``chunk_bytes``; at most two such buffers are alive at a time
(forward and backward), whatever the sequence length. Backward saves two floats per token
and recomputes the softmax chunk by chunk; the entropy's gradient is computed only when a
loss uses the entropy. Padded vocabulary rows (ids >= ``vocab_size``) are excluded, as they
are for the unpadded model vLLM serves.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 64 * 1024**2


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _float_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Float32 logits / temperature; a view (no copy) for float32 logits at temperature 1. Never modified."""
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, temperature, chunk_tokens, group):
        ctx.set_materialize_grads(False)
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        n, v_local = flat.shape
        valid = max(min(vocab_size - vocab_start, v_local), 0)  # this slice's real (unpadded) ids
        logprob = torch.empty(n, dtype=torch.float32, device=flat.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)  # log-sum-exp: log p = z - lse
        for s in range(0, n, chunk_tokens):
            z = _float_logits(flat[s : s + chunk_tokens], temperature)
            local_max = z[:, :valid].max(dim=-1).values if valid else z.new_full((z.shape[0],), float("-inf"))
            m = _all_reduce(local_max, dist.ReduceOp.MAX, group)
            e = (z - m.unsqueeze(-1)).exp_()  # the one chunk-sized buffer
            e[:, valid:] = 0.0
            sum_e = _all_reduce(e.sum(-1), dist.ReduceOp.SUM, group)
            local = tgt[s : s + chunk_tokens] - vocab_start
            owned = (local >= 0) & (local < valid)
            picked = z.gather(-1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
            t_logit = _all_reduce(torch.where(owned, picked, torch.zeros_like(picked)), dist.ReduceOp.SUM, group)
            expected = _all_reduce(_rowdot(e, z), dist.ReduceOp.SUM, group) / sum_e
            chunk_lse = m + sum_e.log()
            logprob[s : s + chunk_tokens] = t_logit - chunk_lse
            entropy[s : s + chunk_tokens] = chunk_lse - expected
            lse[s : s + chunk_tokens] = chunk_lse
            del z, e
        ctx.save_for_backward(logits, target, lse, entropy)
        ctx.args = (vocab_start, valid, temperature, chunk_tokens)
        return logprob.view(target.shape), entropy.view(target.shape)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        logits, target, lse, entropy = ctx.saved_tensors
        vocab_start, valid, temperature, chunk_tokens = ctx.args
        flat = logits.reshape(-1, logits.shape[-1])
        n = flat.shape[0]
        tgt = target.reshape(-1)
        g_lp = grad_logprob.reshape(-1).float() if grad_logprob is not None else torch.zeros_like(lse)
        grad = torch.empty_like(flat)
        for s in range(0, n, chunk_tokens):
            sl = slice(s, s + chunk_tokens)
            z = _float_logits(flat[sl], temperature)
            # p = exp(z - lse), written straight into the gradient buffer when it is float32
            p = torch.sub(z, lse[sl].unsqueeze(-1), out=grad[sl]) if grad.dtype == torch.float32 else z - lse[sl, None]
            if grad_entropy is None:
                dz = p.exp_().mul_(-g_lp[sl].unsqueeze(-1))  # d log p_t / dz = onehot_t - p
            else:  # d H / dz = -p * (log p + H)
                logp = p.clone()
                p.exp_()
                logp.add_(entropy[sl].unsqueeze(-1)).mul_(grad_entropy.reshape(-1)[sl].float().unsqueeze(-1))
                dz = logp.add_(g_lp[sl].unsqueeze(-1)).mul_(p).neg_()
            dz[:, valid:] = 0.0
            local = tgt[sl] - vocab_start
            rows = torch.nonzero((local >= 0) & (local < valid)).squeeze(-1)
            dz[rows, local[rows]] += g_lp[sl][rows]
            if temperature != 1.0:
                dz.div_(temperature)
            if dz.data_ptr() != grad[sl].data_ptr():
                grad[sl] = dz
            del z, p, dz
        return grad.view_as(logits), None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target`` and entropy of the softmax at every position, in float32.

    ``logits``: [..., V_local], this rank's vocabulary slice starting at ``vocab_start``.
    ``target``: [...] token ids in the global vocabulary. ``vocab_size``: the unpadded size.
    ``group``: the tensor-parallel group (None for an unsplit vocabulary).
    """
    if vocab_size is None:
        vocab_size = vocab_start + logits.shape[-1]
    chunk_tokens = max(1, chunk_bytes // (4 * logits.shape[-1]))
    return _VocabParallelLogProbs.apply(logits, target, vocab_start, vocab_size, temperature, chunk_tokens, group)


def megatron_logprobs(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, temperature: float = 1.0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vocab_parallel_logprobs`` for the logits of a Megatron model in the current TP group."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    return vocab_parallel_logprobs(
        logits, target, vocab_start=rank * logits.shape[-1], vocab_size=vocab_size, temperature=temperature,
        chunk_bytes=chunk_bytes, group=parallel_state.get_tensor_model_parallel_group(),
    )

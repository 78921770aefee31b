"""From rewards to advantages: DAPO's overlong shaping, then normalisation per prompt group (FlowRL, GRPO, GSPO) or
over the whole batch (REINFORCE++), or, for PPO, per-token advantages by GAE from the critic's values."""

from __future__ import annotations

import torch
import torch.distributed as dist

EPS = 1e-6


def group_normalized(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(r - mean_g) / (std_g + eps)`` with the unbiased std of each prompt's group.

    A group whose rewards are all equal (or that has one member) carries no signal: 0.
    """
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx].float()
        if r.numel() > 1 and not torch.all(r == r[0]):
            out[idx] = (r - r.mean()) / (r.std(unbiased=True) + eps)
    return out


def batch_normalized(rewards: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` over the whole (global) batch."""
    r = rewards.float()
    if r.numel() < 2 or torch.all(r == r[0]):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std(unbiased=True) + eps)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, to be added to the rewards: 0 up to ``max_tokens - buffer`` response tokens,
    then falling linearly to ``-penalty`` at ``max_tokens``."""
    if not buffer:
        return torch.zeros_like(lengths, dtype=torch.float32)
    excess = (lengths.float() - (max_tokens - buffer)).clamp(min=0, max=buffer)
    return -penalty * excess / buffer


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation for an outcome reward: the sequence's reward ``rewards`` [B] arrives at its
    last response token, ``values`` [B, S] are V(state before token t), token-aligned like the log-probs, and the
    value after the last token is 0. ``A_t = sum_l (gamma lam)^l delta_{t+l}``, ``delta_t = r_t + gamma V_{t+1} -
    V_t``; returns ``(advantages, returns = advantages + values)``, 0 outside ``mask`` [B, S] (the response)."""
    m = mask.to(values.dtype)
    last = mask & (mask.long().cumsum(1) == mask.long().sum(1, keepdim=True))
    token_rewards = last.to(values.dtype) * rewards.to(values.dtype).unsqueeze(1)
    advantages = torch.zeros_like(values)
    next_value = next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value, next_advantage = values[:, t] * m[:, t], advantages[:, t]
    return advantages, (advantages + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup | None = None,
           eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the tokens in ``mask`` (unbiased variance), across the ranks of
    ``group`` too (the data-parallel ranks that share a step's batch); 0 outside ``mask``."""
    m = mask.double()
    sums = torch.stack([(x.double() * m).sum(), (x.double().pow(2) * m).sum(), m.sum()])
    if group is not None:
        dist.all_reduce(sums, group=group)
    total, squares, n = sums.tolist()
    mean = total / max(n, 1)
    var = (squares - n * mean**2) / max(n - 1, 1)
    return ((x - mean) * (var + eps) ** -0.5 * mask).to(x.dtype)

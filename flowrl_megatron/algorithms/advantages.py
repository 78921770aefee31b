"""From rewards to advantages: DAPO's overlong shaping, then normalisation per prompt group (FlowRL, GRPO, GSPO) or
over the whole batch (REINFORCE++)."""

from __future__ import annotations

import torch

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

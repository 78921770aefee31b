"""Reward normalisation: per prompt group (FlowRL, GRPO) or over the whole batch (REINFORCE++)."""

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

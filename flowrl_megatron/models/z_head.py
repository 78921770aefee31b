"""FlowRL's learned partition function log Z(x): an MLP on the mean of the prompt's hidden states."""

from __future__ import annotations

import torch
from torch import nn

from flowrl_megatron.config import ZHeadConfig


class ZHead(nn.Module):
    def __init__(self, hidden_size: int, cfg: ZHeadConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(2):
            blocks += [nn.Linear(hidden_size, hidden_size, dtype=dtype), nn.GELU()]
            if cfg.variant == "authors":
                blocks += [nn.LayerNorm(hidden_size, dtype=dtype), nn.Dropout(cfg.dropout)]
        blocks.append(nn.Linear(hidden_size, 1, dtype=dtype))
        self.net = nn.Sequential(*blocks)
        self.detach_input = cfg.detach_input
        # Its own generator: the same initial head for every layout and seed of the global RNG.
        generator = torch.Generator().manual_seed(cfg.init_seed)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                seeded_init(layer, generator)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[b, h] pooled prompt states -> [b] log Z, in float32."""
        if self.detach_input:
            pooled = pooled.detach()
        return self.net(pooled).squeeze(-1).float()


def seeded_init(layer: nn.Linear, generator: torch.Generator) -> None:
    """torch's default range for a linear layer, U(-1/sqrt(in), 1/sqrt(in)), drawn from ``generator``: a head's
    initial weights then depend on neither the parallel layout nor the global RNG."""
    bound = 1 / layer.in_features**0.5
    with torch.no_grad():
        layer.weight.copy_(torch.empty_like(layer.weight).uniform_(-bound, bound, generator=generator))
        layer.bias.copy_(torch.empty_like(layer.bias).uniform_(-bound, bound, generator=generator))


def mean_pool(
    hidden: torch.Tensor, prompt_mask: torch.Tensor, sample_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``hidden`` [s, b, h] (Megatron's layout) over each sample's prompt tokens.

    ``prompt_mask`` [b, s] marks prompt tokens. Padded rows (one sample per row): returns [b, h].
    Packed rows: ``sample_ids`` [b, s] numbers the samples 0..n-1 across the batch; returns [n, h].
    """
    if sample_ids is None:
        mask = prompt_mask.to(hidden.dtype).transpose(0, 1).unsqueeze(-1)  # [s, b, 1]
        return (hidden * mask).sum(0) / mask.sum(0).clamp(min=1)
    flat = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [b*s, h]
    keep = prompt_mask.reshape(-1)
    ids = sample_ids.reshape(-1)[keep]
    n = int(sample_ids.max().item()) + 1
    sums = flat.new_zeros(n, flat.shape[-1]).index_add(0, ids, flat[keep])
    counts = torch.bincount(ids, minlength=n).clamp(min=1).to(flat.dtype)
    return sums / counts.unsqueeze(-1)

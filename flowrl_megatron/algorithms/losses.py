"""FlowRL and the clipped-surrogate baselines (GRPO, REINFORCE++, GSPO, PPO), on per-token log-probs; PPO's value
loss.

Every loss returns ``(sum of per-unit losses, number of units, stats)``. The unit is the
sequence for FlowRL (the paper's sequence-mean aggregation) and GSPO, and the response token for
the token-level clipped surrogate (token-mean over the batch). Samples outside ``keep`` (DAPO's
overlong filtering) add nothing to either. megatron-core's schedule is run with
``calculate_per_token_loss`` so the sums and counts are added over micro-batches and
data-parallel ranks before dividing: the gradient is the same for any micro-batch size,
micro-batch count or DP size.

Stats keys say how they aggregate: ``seq/`` (mean over sequences), ``tok/`` (mean over
response tokens), ``max/`` (maximum), ``grp/`` (a sum per prompt group); values are sums (or
maxima) over the micro-batch.

Importance weights compare the current policy with ``old_logprobs``: the policy that sampled (the
engines' log-probs when samples come from older weights, see docs/algorithms.md). FlowRL's weighted
squared residual has no trust region of its own, so besides clipping or capping the weight a
sequence can be masked: dropped from the loss when its per-token geometric-mean ratio
``exp(mean_t log pi/pi_old)`` leaves ``[1 - mask_eps, 1 + mask_eps]`` (for the clipped surrogate,
on top of PPO's clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowrl_megatron.algorithms.advantages import batch_normalized, group_normalized
from flowrl_megatron.config import AlgorithmConfig


@dataclass
class LossInputs:
    """One micro-batch, token-aligned: position t holds log p(token_t | tokens < t)."""

    logprobs: torch.Tensor  # [b, s] float32, current policy (differentiable)
    entropy: torch.Tensor  # [b, s]
    old_logprobs: torch.Tensor  # [b, s] policy that generated the samples
    ref_logprobs: torch.Tensor  # [b, s] frozen reference
    response_mask: torch.Tensor  # [b, s] bool: response tokens
    advantages: torch.Tensor  # [b] normalised rewards (r_hat), or [b, s] per-token advantages (PPO)
    log_z: torch.Tensor | None = None  # [b] FlowRL partition function of each prompt
    group_ids: torch.Tensor | None = None  # [b] prompt group in range(groups): per-group stats when given
    groups: int = 0
    keep: torch.Tensor | None = None  # [b] bool: samples in the loss (None: all)

    def kept(self) -> torch.Tensor:
        """[b] float: 1 for the samples in the loss."""
        if self.keep is None:
            return torch.ones(self.advantages.shape[0], dtype=self.logprobs.dtype, device=self.logprobs.device)
        return self.keep.to(self.logprobs.dtype)


def normalize_rewards(cfg: AlgorithmConfig, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The whole global batch's rewards -> the per-sequence advantage the loss uses."""
    if cfg.normalization == "group":
        return group_normalized(rewards, group_ids)
    if cfg.normalization == "batch":
        return batch_normalized(rewards)
    return rewards.float()


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1)


def sequence_mask(cfg: AlgorithmConfig, log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b] float: 1 where the sequence stays in the loss, 0 where ``importance_weight="mask"`` drops it (its
    per-token geometric-mean ratio ``pi/pi_old`` leaves ``[1 - mask_eps, 1 + mask_eps]``)."""
    if cfg.importance_weight != "mask":
        return torch.ones(log_ratio.shape[0], device=log_ratio.device)
    geo = (_masked_sum(log_ratio.detach(), mask) / mask.sum(-1).clamp(min=1)).exp()
    return ((geo >= 1 - cfg.mask_eps) & (geo <= 1 + cfg.mask_eps)).float()


def importance_weight(cfg: AlgorithmConfig, log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence-level ``pi/pi_old`` (detached), transformed per the variant; also whether it was clipped."""
    w = log_w.detach().exp()
    if cfg.importance_weight in ("clip", "mask"):
        used = w.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    elif cfg.importance_weight == "cap":
        used = w.clamp(max=cfg.weight_cap)
    else:
        used = w
    return used, used != w


def _group_stats(x: LossInputs, residual: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each prompt group's residual sum and size: log Z's gap to the value that zeroes the group's mean residual."""
    if x.group_ids is None:
        return {}
    zeros = residual.new_zeros(x.groups)
    return {"grp/residual": zeros.index_add(0, x.group_ids, residual.detach()),
            "grp/count": zeros.index_add(0, x.group_ids, torch.ones_like(residual))}


def flowrl_loss(cfg: AlgorithmConfig, x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Trajectory balance: ``w * (log Z + mean log pi - beta * r_hat - mean log pi_ref)^2`` per sequence."""
    if x.log_z is None:
        raise ValueError("FlowRL needs log Z: build the policy with a Z head and pass the prompt mask.")
    mask = x.response_mask.float()
    n_tok = mask.sum(-1).clamp(min=1)
    mean_logp = _masked_sum(x.logprobs, mask) / n_tok
    mean_ref = _masked_sum(x.ref_logprobs, mask) / n_tok
    residual = x.log_z + mean_logp - cfg.beta * x.advantages - mean_ref
    log_ratio = x.logprobs - x.old_logprobs
    w, clipped = importance_weight(cfg, _masked_sum(log_ratio, mask))
    kept = sequence_mask(cfg, log_ratio, mask)
    w = w * kept * x.kept()
    per_seq = w * residual.pow(2)
    stats = {
        "seq/loss": per_seq.detach().sum(),
        "seq/log_z": x.log_z.detach().sum(),
        "seq/residual": residual.detach().sum(),
        "seq/residual_sq": residual.detach().pow(2).sum(),
        "seq/importance_weight": w.sum(),
        "max/importance_weight": w.max(),
        "seq/clip_fraction": clipped.float().sum(),
        "seq/policy_logprob": mean_logp.detach().sum(),
        "seq/ref_logprob": mean_ref.detach().sum(),
        "tok/entropy": _masked_sum(x.entropy.detach(), mask).sum(),
        **_group_stats(x, residual),
    }
    if cfg.importance_weight == "mask":
        stats["seq/mask_fraction"] = (1 - kept).sum()
    return per_seq.sum(), x.kept().sum().to(torch.int), stats


def clipped_surrogate_loss(
    cfg: AlgorithmConfig, x: LossInputs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clipped token-level surrogate with a sequence advantage (GRPO, REINFORCE++) or a token one (PPO),
    token-mean; asymmetric clip range with ``clip_eps_high`` (DAPO's clip-higher)."""
    mask = x.response_mask.float() * x.kept().unsqueeze(-1)
    log_ratio = x.logprobs - x.old_logprobs
    ratio = log_ratio.exp()
    adv = x.advantages if x.advantages.dim() == 2 else x.advantages.unsqueeze(-1)
    clipped_ratio = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    kept = sequence_mask(cfg, log_ratio, mask)
    per_tok = -torch.minimum(ratio * adv, clipped_ratio * adv) * kept.unsqueeze(-1)
    stats: dict[str, torch.Tensor] = {}
    if cfg.importance_weight == "mask":
        stats["seq/mask_fraction"] = (1 - kept).sum()
    if cfg.kl_coef:
        d = x.ref_logprobs - x.logprobs
        kl = d.exp() - d - 1  # k3 estimator of KL(pi || pi_ref), >= 0
        per_tok = per_tok + cfg.kl_coef * kl
        stats["tok/kl_ref"] = _masked_sum(kl.detach(), mask).sum()
    total = _masked_sum(per_tok, mask).sum()
    stats.update({
        "tok/loss": total.detach(),
        "tok/ratio": _masked_sum(ratio.detach(), mask).sum(),
        "max/ratio": (ratio.detach() * mask).max(),
        "tok/clip_fraction": _masked_sum((ratio != clipped_ratio).float(), mask).sum(),
        "tok/entropy": _masked_sum(x.entropy.detach(), mask).sum(),
        "seq/policy_logprob": (_masked_sum(x.logprobs.detach(), mask) / mask.sum(-1).clamp(min=1)).sum(),
    })
    return total, mask.sum().to(torch.int), stats


def sequence_surrogate_loss(
    cfg: AlgorithmConfig, x: LossInputs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): the PPO-clipped surrogate on the sequence ratio ``s = exp(mean_t log pi/pi_old)``
    (length-normalised, so its gradient is s times the mean token score), clipped per sequence, sequence-mean."""
    mask = x.response_mask.float()
    n_tok = mask.sum(-1).clamp(min=1)
    log_ratio = x.logprobs - x.old_logprobs
    seq_ratio = (_masked_sum(log_ratio, mask) / n_tok).exp()
    clipped_ratio = seq_ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    in_band = sequence_mask(cfg, log_ratio, mask)
    per_seq = -torch.minimum(seq_ratio * x.advantages, clipped_ratio * x.advantages) * in_band * x.kept()
    stats = {
        "seq/loss": per_seq.detach().sum(),
        "seq/ratio": seq_ratio.detach().sum(),
        "max/ratio": seq_ratio.detach().max(),
        "seq/clip_fraction": (seq_ratio != clipped_ratio).float().sum(),
        "tok/entropy": _masked_sum(x.entropy.detach(), mask).sum(),
        "seq/policy_logprob": (_masked_sum(x.logprobs.detach(), mask) / n_tok).sum(),
    }
    if cfg.importance_weight == "mask":
        stats["seq/mask_fraction"] = (1 - in_band).sum()
    return per_seq.sum(), x.kept().sum().to(torch.int), stats


def policy_loss(cfg: AlgorithmConfig, x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    if cfg.name == "flowrl":
        return flowrl_loss(cfg, x)
    if cfg.name == "gspo":
        return sequence_surrogate_loss(cfg, x)
    return clipped_surrogate_loss(cfg, x)  # GRPO, REINFORCE++, PPO


def value_loss(value_clip: float, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss, token-mean: ``0.5 max((V - R)^2, (clip(V, V_old +- value_clip) - R)^2)``, the
    pessimistic of the free and the clipped error (so the value moves at most ``value_clip`` per step where that
    would lower the loss)."""
    m = mask.float()
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    free, held = (values - returns).pow(2), (clipped - returns).pow(2)
    per_tok = 0.5 * torch.maximum(free, held)
    total = _masked_sum(per_tok, m).sum()
    stats = {
        "tok/value_loss": total.detach(),
        "tok/value": _masked_sum(values.detach(), m).sum(),
        "tok/return": _masked_sum(returns, m).sum(),
        "tok/value_clip_fraction": _masked_sum((held > free).float(), m).sum(),
    }
    return total, m.sum().to(torch.int), stats

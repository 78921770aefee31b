"""Train-vs-rollout log-prob mismatch: the check that the engines sample from the weights being trained.

After a weight sync, the trainer's log-probs of the sampled tokens (same temperature) should
equal the engine's. A large gap means stale or corrupt engine weights (a failed sync, a wrong
mapping, a dtype problem), and training on such samples silently biases every importance
weight, so above a threshold the run stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mismatch:
    mean_abs_diff: float  # mean over response tokens of |log pi_train - log pi_rollout|
    mean_prob_ratio: float  # mean over response tokens of pi_train / pi_rollout (1 when they agree)
    max_abs_diff: float
    tokens: int

    def as_metrics(self) -> dict[str, float]:
        return {"mismatch/mean_abs_logprob_diff": self.mean_abs_diff, "mismatch/mean_prob_ratio": self.mean_prob_ratio,
                "mismatch/max_abs_logprob_diff": self.max_abs_diff}


class StaleWeightsError(RuntimeError):
    pass


def logprob_mismatch(train: torch.Tensor, rollout: torch.Tensor, response_mask: torch.Tensor) -> Mismatch:
    """Compare token-aligned [B, S] log-probs over the response tokens."""
    mask = response_mask.bool()
    diff = (train.double() - rollout.double())[mask]
    if diff.numel() == 0:
        return Mismatch(0.0, 1.0, 0.0, 0)
    return Mismatch(diff.abs().mean().item(), diff.exp().mean().item(), diff.abs().max().item(), diff.numel())


def check_mismatch(m: Mismatch, max_mean_abs_diff: float, step: int) -> None:
    """Stop the run, saying what to look at, when the engines no longer sample from the trained weights."""
    if m.mean_abs_diff > max_mean_abs_diff:
        raise StaleWeightsError(
            f"step {step}: rollout log-probs differ from the trainer's by {m.mean_abs_diff:.4g} per token on average "
            f"(limit {max_mean_abs_diff:g}; prob ratio {m.mean_prob_ratio:.4g}); the engines are not serving the "
            "trained weights: check the last weight sync in the engine logs, or raise the limit if a dtype "
            "difference between trainer and engines (bf16 vs fp32) explains it."
        )

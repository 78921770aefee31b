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


def probe_stats(train: torch.Tensor, engines: list[list[list[float]]], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums of |train - engine| log-prob over the probe tokens ``mask`` (prompts x positions), for each engine:
    stats for ``training.step.reduce_stats`` (``probe/engineE``, ``max/probe_engineE``, ``count/probe_tokens``)."""
    out = {"count/probe_tokens": mask.sum().float()}
    for e, rows in enumerate(engines):
        engine = torch.zeros_like(train)
        for i, lps in enumerate(rows):
            engine[i, : len(lps)] = torch.tensor(lps, dtype=train.dtype)
        diff = train.double() - engine.double()
        out[f"probe/engine{e}"] = (diff.abs() * mask).sum()
        out[f"probe/engine{e}_ratio"] = (diff.exp() * mask).sum()
        out[f"max/probe_engine{e}"] = (diff.abs() * mask).max()
    return out


def probe_mismatch(stats: dict[str, float], engines: int) -> tuple[int, Mismatch]:
    """The engine whose probe log-probs differ most from the trainer's, and by how much (from reduced stats)."""
    tokens = max(stats["count/probe_tokens"], 1)
    means = [stats[f"probe/engine{e}"] / tokens for e in range(engines)]
    worst = max(range(engines), key=lambda e: means[e])
    return worst, Mismatch(means[worst], stats[f"probe/engine{worst}_ratio"] / tokens,
                           stats[f"probe_engine{worst}_max"], int(tokens))


def check_mismatch(m: Mismatch, max_mean_abs_diff: float, step: int, what: str = "rollout log-probs") -> None:
    """Stop the run, saying what to look at, when the engines no longer sample from the trained weights."""
    if m.mean_abs_diff > max_mean_abs_diff:
        raise StaleWeightsError(
            f"step {step}: {what} differ from the trainer's by {m.mean_abs_diff:.4g} per token on average "
            f"(limit {max_mean_abs_diff:g}; prob ratio {m.mean_prob_ratio:.4g}); the engines are not serving the "
            "trained weights: check the last weight sync in the engine logs, or raise the limit if a dtype "
            "difference between trainer and engines (bf16 vs fp32) explains it."
        )

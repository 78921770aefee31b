"""What rollouts hand to training: scored prompt groups with the weight versions that sampled them."""

from __future__ import annotations

from dataclasses import dataclass, field

from flowrl_megatron.data.prompts import Prompt
from flowrl_megatron.rollout.client import Sample


@dataclass(frozen=True)
class RolloutGroup:
    """One prompt's n samples, their rewards, and the weight versions of their first and last tokens.

    The versions bound the sample's age: a group first sampled at version v and trained at version t has
    staleness t - v. ``order`` is the prompt's position in the data order (epoch x prompts + offset), what a
    resumed run re-issues when the group was never trained.
    """

    prompt: Prompt
    order: int
    samples: list[Sample]
    rewards: list[float]
    first_version: int
    last_version: int
    reward_timeouts: int = 0
    reward_errors: int = 0
    fractions: list[float | None] = field(default_factory=list)  # tests passed per sample (code rewards)

    @property
    def rewards_differ(self) -> bool:
        """Whether the group carries a learning signal for group-normalised baselines (dynamic sampling keeps it)."""
        return any(r != self.rewards[0] for r in self.rewards)


@dataclass
class RolloutBatch:
    """The groups of one training step and what happened on the way: reward failures, groups dropped (and
    re-issued) with their reason, seconds the trainer waited for them."""

    groups: list[RolloutGroup]
    dropped: dict[str, int] = field(default_factory=dict)
    wait_s: float = 0.0

    @property
    def reward_timeouts(self) -> int:
        return sum(g.reward_timeouts for g in self.groups)

    @property
    def reward_errors(self) -> int:
        return sum(g.reward_errors for g in self.groups)

    @property
    def test_pass_fraction(self) -> float | None:
        known = [f for g in self.groups for f in g.fractions if f is not None]
        return sum(known) / len(known) if known else None

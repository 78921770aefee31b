"""One step's training data as a typed batch, from the rollout groups to each rank's rows.

Rows are samples (prompt then response, right-padded) and per-token fields are token-aligned: position t of a
``*_logprobs`` field holds log p(token_t | tokens < t). Per-token fields are [B, S], per-sample ones [B]; a field
that is None is absent (``old_logprobs`` None: on-policy, w = 1; ``ref_logprobs`` None: zeros, GRPO without KL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowrl_megatron.algorithms.advantages import overlong_penalty
from flowrl_megatron.algorithms.losses import normalize_rewards
from flowrl_megatron.config import AlgorithmConfig, RewardConfig
from flowrl_megatron.training.micro_batches import MicroBatching, data_parallel_split


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, S] long
    prompt_mask: torch.Tensor  # [B, S] bool: the prompt's tokens (Z-head pooling)
    response_mask: torch.Tensor  # [B, S] bool: the response's tokens (the loss)
    rollout_logprobs: torch.Tensor | None = None  # [B, S] the engines' (behaviour policy's) log-probs
    old_logprobs: torch.Tensor | None = None  # [B, S] the importance weights' denominator
    ref_logprobs: torch.Tensor | None = None  # [B, S] frozen reference
    rewards: torch.Tensor | None = None  # [B] raw rewards
    advantages: torch.Tensor | None = None  # [B] normalised rewards (r_hat), or [B, S] per token (PPO's GAE)
    values: torch.Tensor | None = None  # [B, S] PPO: the critic's values when the step began (value clipping)
    returns: torch.Tensor | None = None  # [B, S] PPO: the value targets, advantages + values
    group_ids: torch.Tensor | None = None  # [B] long: the prompt group of each sample
    truncated: torch.Tensor | None = None  # [B] bool: the response hit the token limit
    first_version: torch.Tensor | None = None  # [B] long: weight version that sampled the first token
    last_version: torch.Tensor | None = None  # [B] long: ... and the last token
    current: torch.Tensor | None = None  # [B] bool: sampled entirely by the weights now trained (mismatch check)
    keep: torch.Tensor | None = None  # [B] bool: samples in the loss (overlong filtering leaves truncated ones out)

    def fields(self) -> dict[str, torch.Tensor]:
        """The present fields by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def replace(self, **values: torch.Tensor | None) -> Batch:
        return dataclasses.replace(self, **values)

    def loss_mask(self) -> torch.Tensor:
        """[B, S] bool: the response tokens of the samples in the loss (``keep``)."""
        return self.response_mask if self.keep is None else self.response_mask & self.keep[:, None]

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def lengths(self) -> list[int]:
        """Tokens of each row (prompt + response)."""
        return (self.prompt_mask | self.response_mask).sum(1).tolist()

    def select(self, rows: slice | torch.Tensor, width: int | None = None) -> Batch:
        """These rows; per-token fields cut to ``width`` columns when given."""
        cut = slice(None) if width is None else slice(0, width)
        return Batch(**{k: v[rows][:, cut] if v.dim() == 2 else v[rows] for k, v in self.fields().items()})

    def trimmed(self, rows: slice | torch.Tensor) -> Batch:
        """These rows without the padding columns none of them uses (the same on every stage of a pipeline)."""
        part = self.select(rows)
        return part.select(slice(None), int((part.prompt_mask | part.response_mask).sum(1).max()))

    def padded(self, multiple: int) -> Batch:
        """Rows appended (copies of row 0 with nothing to score) until their count is a multiple of ``multiple``."""
        extra = -self.rows % multiple
        if not extra:
            return self
        out = Batch(**{k: torch.cat([v, v[:1].expand(extra, *v.shape[1:])]) for k, v in self.fields().items()})
        out.response_mask[-extra:] = False
        return out

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) for k, v in self.fields().items()})


def build_batch(groups: Sequence) -> Batch:
    """Rollout groups (``rollout.groups.RolloutGroup``: a prompt, its samples, rewards, weight versions) -> rows."""
    rows = [(g, s) for g in groups for s in g.samples]
    width = max(len(g.prompt.token_ids) + len(s.token_ids) for g, s in rows)
    b = len(rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    prompt_mask = torch.zeros(b, width, dtype=torch.bool)
    response_mask = torch.zeros(b, width, dtype=torch.bool)
    rollout = torch.zeros(b, width)
    for i, (g, s) in enumerate(rows):
        n_p, n_r = len(g.prompt.token_ids), len(s.token_ids)
        tokens[i, : n_p + n_r] = torch.tensor(g.prompt.token_ids + s.token_ids)
        prompt_mask[i, :n_p] = True
        response_mask[i, n_p : n_p + n_r] = True
        rollout[i, n_p : n_p + n_r] = torch.tensor(s.logprobs)
    per_sample = [(k, g) for k, g in enumerate(groups) for _ in g.samples]
    return Batch(
        tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask, rollout_logprobs=rollout,
        rewards=torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32),
        group_ids=torch.tensor([k for k, _ in per_sample]),
        truncated=torch.tensor([s.finish_reason == "length" for _, s in rows]),
        first_version=torch.tensor([g.first_version for _, g in per_sample]),
        last_version=torch.tensor([g.last_version for _, g in per_sample]),
    )


def step_batch(groups: Sequence, algo: AlgorithmConfig, reward: RewardConfig,
               max_response_tokens: int) -> tuple[Batch, torch.Tensor]:
    """A step's rollout groups -> the global batch the loss reads: DAPO's overlong penalty added to the rewards, the
    rewards normalised into advantages (PPO's are replaced by GAE later), and with overlong filtering the truncated
    samples left out of the loss (``keep``). Also the penalty of each sample."""
    batch = build_batch(groups)
    penalty = overlong_penalty(batch.response_mask.sum(1), max_response_tokens, reward.overlong_buffer,
                               reward.overlong_penalty)
    batch.rewards = batch.rewards + penalty
    batch.advantages = normalize_rewards(algo, batch.rewards, batch.group_ids)
    if algo.mask_truncated:
        batch.keep = ~batch.truncated
    return batch, penalty


def local_rows(batch: Batch, mini_batch_rows: int, dp: int, batching: MicroBatching,
               dp_rank: int) -> list[torch.Tensor]:
    """Data-parallel rank ``dp_rank``'s rows of each mini-batch of ``mini_batch_rows`` rows (equal token loads
    with a token budget)."""
    lengths = batch.lengths()
    out = []
    for start in range(0, len(lengths), mini_batch_rows):
        mine = data_parallel_split(lengths[start : start + mini_batch_rows], dp, batching)[dp_rank]
        out.append(torch.tensor(mine) + start)
    return out


def prompt_batch(prompts: Sequence[Sequence[int]]) -> Batch:
    """Prompts alone as rows (nothing to train on): what a log-prob pass over prompt tokens takes."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    prompt_mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p))
        prompt_mask[i, : len(p)] = True
    return Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=torch.zeros_like(prompt_mask))

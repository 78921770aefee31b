"""Cut a data-parallel rank's samples into micro-batches: a fixed number of rows, or by a token budget.

With a token budget, samples are binned longest first into as few micro-batches as fit the budget. Padded
micro-batches are rows [b, s] cut to their longest sample and cost b x s tokens. Packed micro-batches put their
samples end to end in one row [1, T] with megatron-core's THD parameters (``cu_seqlens``), so attention, RoPE and
the Z head's pooling restart at every sample and no token is padding; they cost T tokens.

The loss reads samples as padded rows either way (``MicroBatch.rows``): ``MicroBatch.to_rows`` puts the packed
token-aligned log-probs into that layout, so the loss code has one form and packed and padded agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from flowrl_megatron.models.gpt import causal_attention_mask
from flowrl_megatron.runtime import device

if TYPE_CHECKING:
    from flowrl_megatron.training.batch import Batch


@dataclass(frozen=True)
class MicroBatching:
    micro_batch_size: int = 1  # rows per micro-batch when max_tokens is 0
    max_tokens: int = 0  # token budget per micro-batch (padded: rows x longest row; packed: sum of lengths)
    packed: bool = False  # THD packing (needs attention that takes packed sequences: TE or SDPA)

    @property
    def dynamic(self) -> bool:
        return self.max_tokens > 0


def balanced_split(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Sample indices in ``parts`` groups with near-equal token sums: longest first to the lightest group."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        lightest = min(range(parts), key=lambda p: (load[p], len(groups[p])))
        groups[lightest].append(i)
        load[lightest] += lengths[i]
    return [sorted(g) for g in groups]


def data_parallel_split(lengths: Sequence[int], dp: int, batching: MicroBatching) -> list[list[int]]:
    """Each data-parallel rank's rows of a mini-batch: equal token loads with a token budget, else equal
    contiguous shares (whole micro-batches each)."""
    if batching.dynamic:
        return balanced_split(lengths, dp)
    share = len(lengths) // dp
    if share * dp != len(lengths) or share % batching.micro_batch_size:
        raise ValueError(f"{len(lengths)} samples do not split into dp={dp} ranks x whole micro-batches of "
                         f"{batching.micro_batch_size}")
    return [list(range(r * share, (r + 1) * share)) for r in range(dp)]


def plan(lengths: Sequence[int], batching: MicroBatching) -> list[list[int]]:
    """Row indices of each micro-batch; with a token budget none exceeds it (first-fit decreasing)."""
    if not batching.dynamic:
        size = batching.micro_batch_size
        if len(lengths) % size:
            raise ValueError(f"batch of {len(lengths)} samples is not a multiple of micro_batch_size={size}")
        return [list(range(i, i + size)) for i in range(0, len(lengths), size)]
    bins: list[list[int]] = []
    used: list[int] = []  # packed: tokens in the bin; padded: its rows (its longest row is its first)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > batching.max_tokens:
            raise ValueError(f"a sample of {n} tokens exceeds the micro-batch budget of {batching.max_tokens}")
        for b, members in enumerate(bins):
            cost = used[b] + n if batching.packed else (used[b] + 1) * lengths[members[0]]
            if cost <= batching.max_tokens:
                members.append(i)
                used[b] = used[b] + n if batching.packed else used[b] + 1
                break
        else:
            bins.append([i])
            used.append(n if batching.packed else 1)
    return [sorted(members) for members in bins]


@dataclass
class MicroBatch:
    """The samples of one forward/backward: as padded rows for the loss, as the model's input (maybe packed).

    The index tensors derived from ``lengths`` are computed once and kept: every pass uses them several times.
    """

    rows: Batch  # [n, L] per token (L = longest sample here) or [n] per sample
    lengths: torch.Tensor  # [n] tokens per sample, on the CPU (index arithmetic there: no device syncs)
    index: torch.Tensor  # [n] the samples' rows in the batch they were cut from
    packed: bool

    @property
    def tokens(self) -> int:
        """Tokens the model processes, padding included."""
        n, width = self.rows.tokens.shape
        return int(self.lengths.sum()) if self.packed else n * width

    @property
    def device(self) -> torch.device:
        return self.rows.tokens.device

    @cached_property
    def _flat_index(self) -> torch.Tensor:
        """Where each packed token sits in the rows [n, L], flattened."""
        return self.sample_ids[0] * self.rows.tokens.shape[1] + self.positions[0]

    @cached_property
    def sample_ids(self) -> torch.Tensor:
        """[1, T]: which sample each packed token belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.lengths)), self.lengths)[None].to(self.device)

    @cached_property
    def positions(self) -> torch.Tensor:
        """Token positions within each sample: [1, T] packed, [n, L] padded."""
        if not self.packed:
            n, width = self.rows.tokens.shape
            return torch.arange(width, device=self.device).expand(n, width)
        starts = torch.cumsum(self.lengths, 0) - self.lengths
        within = torch.arange(int(self.lengths.sum())) - torch.repeat_interleave(starts, self.lengths)
        return within[None].to(self.device)

    def pack(self, per_token: torch.Tensor) -> torch.Tensor:
        """[n, L] rows -> the model's layout ([1, T] packed; unchanged padded)."""
        return per_token.reshape(-1)[self._flat_index][None] if self.packed else per_token

    def to_rows(self, token_aligned: torch.Tensor) -> torch.Tensor:
        """Token-aligned values (position t: log p(token_t | < t)) in the model's layout -> [n, L] rows.

        Packed: each sample's first position, which the previous sample's last logits "predicted", becomes 0, as
        in padded rows. Differentiable.
        """
        if not self.packed:
            return token_aligned
        values = token_aligned[0].masked_fill(self.positions[0] == 0, 0.0)
        n, width = self.rows.tokens.shape
        return values.new_zeros(n * width).index_copy(0, self._flat_index, values).view(n, width)

    def model_inputs(self, with_prompt_mask: bool) -> dict:
        """Keyword arguments of the model's forward pass for these samples."""
        inputs = {"input_ids": self.pack(self.rows.tokens), "position_ids": self.positions}
        if self.packed:
            cu = torch.zeros(len(self.lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(self.lengths, 0)
            cu = cu.to(self.device)
            longest = int(self.lengths.max())
            inputs["attention_mask"] = None
            inputs["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                          max_seqlen_q=longest, max_seqlen_kv=longest)
        else:
            inputs["attention_mask"] = causal_attention_mask(self.rows.tokens.shape[1], self.device)
        if with_prompt_mask:
            inputs["prompt_mask"] = self.pack(self.rows.prompt_mask)
            if self.packed:
                inputs["sample_ids"] = self.sample_ids
        return inputs


def micro_batches(batch: Batch, batching: MicroBatching) -> list[MicroBatch]:
    """``batch`` (rows, right-padded) cut into micro-batches per ``batching``, each trimmed to its longest row and
    moved to this rank's device."""
    lengths = batch.lengths()
    out = []
    for members in plan(lengths, batching):
        index = torch.tensor(members)
        rows = batch.select(index, max(lengths[i] for i in members)).to(device())
        out.append(MicroBatch(rows, torch.tensor([lengths[i] for i in members]), index, batching.packed))
    return out


def padding_fraction(batches: Sequence[MicroBatch]) -> float:
    """Share of the processed tokens that are padding."""
    processed = sum(mb.tokens for mb in batches)
    real = sum(int(mb.lengths.sum()) for mb in batches)
    return 1.0 - real / max(processed, 1)

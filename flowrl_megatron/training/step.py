"""Policy updates and log-prob passes through megatron-core's pipeline schedule.

A pass takes this data-parallel rank's ``Batch`` (``training.batch``). In ``forward_backward``, a batch with
``rollout_logprobs`` also reports the train-vs-rollout mismatch over the samples its ``current`` marks (all when
absent): the weights that sampled them are the weights being trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from flowrl_megatron.algorithms.logprobs import megatron_logprobs
from flowrl_megatron.algorithms.losses import LossInputs, policy_loss
from flowrl_megatron.config import AlgorithmConfig
from flowrl_megatron.runtime import device
from flowrl_megatron.training.batch import Batch
from flowrl_megatron.training.micro_batches import MicroBatch, MicroBatching, micro_batches


def token_logprobs(logits, tokens, vocab_size: int, temperature: float):
    """Log-prob of token t from the logits at t-1, placed at position t (position 0 is 0).

    The targets are shifted rather than the logits sliced, which would copy all logits.
    """
    next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the last position's target is unused
    lp, ent = megatron_logprobs(logits, next_tokens, vocab_size, temperature)
    return token_aligned(lp), token_aligned(ent)


def token_aligned(per_position: torch.Tensor) -> torch.Tensor:
    """[b, s] computed at position t - 1 (from the tokens up to it), placed at position t; position 0 is 0."""
    return torch.cat([per_position.new_zeros(per_position.shape[0], 1), per_position[:, :-1]], dim=1)


def _logprobs(micro: MicroBatch, logits, vocab_size: int, temperature: float):
    """Token-aligned log-probs and entropies of the micro-batch's samples, as rows [n, L]."""
    lp, ent = token_logprobs(logits, micro.pack(micro.rows.tokens), vocab_size, temperature)
    return micro.to_rows(lp), micro.to_rows(ent)


def run_schedule(model_chunks, batches: list[MicroBatch], step_fn, forward_only: bool) -> list:
    """megatron-core's schedule over ``batches``; their shapes vary, which pipeline stages exchange first
    (``variable_seq_lengths``), so the shapes given here matter to nothing."""
    n, width = batches[0].rows.tokens.shape
    return get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=iter(batches),
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=width,
        micro_batch_size=n,
        forward_only=forward_only,
    )


def forward_backward(
    model_chunks: list,
    batch: Batch,
    cfg: AlgorithmConfig,
    *,
    batching: MicroBatching,
    vocab_size: int,
    temperature: float = 1.0,
    groups: int = 0,
) -> dict[str, float]:
    """Accumulate the loss gradient of ``batch`` (this DP rank's part of the global batch).

    The loss is a sum over units divided by the number of units in the whole global batch
    (``calculate_per_token_loss``), so gradients do not depend on how the batch is split.
    ``groups`` > 0: the global batch holds that many prompt groups (``batch.group_ids`` in ``range(groups)``),
    and FlowRL reports how far log Z is from each group's best value (``log_z_gap``).
    Returns the global-batch statistics, identical on every rank.
    """
    if not model_chunks[0].config.calculate_per_token_loss:
        raise ValueError("build the policy with calculate_per_token_loss=True for global-batch loss normalisation")

    def step(data_iterator: Iterator, model):
        micro: MicroBatch = next(data_iterator)
        out = model(**micro.model_inputs(with_prompt_mask=cfg.needs_log_z))
        mb = micro.rows

        def loss_func(output):
            logits, log_z = output if isinstance(output, tuple) else (output, None)
            lp, ent = _logprobs(micro, logits, vocab_size, temperature)
            total, count, stats = policy_loss(cfg, LossInputs(
                logprobs=lp, entropy=ent,
                old_logprobs=mb.old_logprobs if mb.old_logprobs is not None else lp.detach(),  # on-policy: w = 1
                ref_logprobs=mb.ref_logprobs if mb.ref_logprobs is not None else torch.zeros_like(lp),
                response_mask=mb.response_mask, advantages=mb.advantages, log_z=log_z,
                group_ids=mb.group_ids if groups else None, groups=groups, keep=mb.keep,
            ))
            mask = mb.response_mask
            if mb.rollout_logprobs is not None:  # weights the engines sampled with: their log-probs must agree
                same = mask if mb.current is None else mask & mb.current[:, None]
                diff = lp.detach() - mb.rollout_logprobs
                stats["mis/mismatch_abs_diff"] = (diff.abs() * same).sum()
                stats["mis/mismatch_prob_ratio"] = (diff.exp() * same).sum()
                stats["max/mismatch_abs_diff"] = (diff.abs() * same).max()
                stats["count/mismatch_tokens"] = same.sum().float()
            stats["count/sequences"] = torch.tensor(float(lp.shape[0]))
            stats["count/tokens"] = mask.sum().float()
            stats["count/sample_tokens"] = micro.lengths.sum().float()
            stats["count/model_tokens"] = torch.tensor(float(micro.tokens))
            stats["count/micro_batches"] = torch.tensor(1.0)
            return total, count, stats

        return out, loss_func

    per_mb = run_schedule(model_chunks, micro_batches(batch, batching), step, forward_only=False)
    return reduce_stats(per_mb)


def forward_logprobs(
    model_chunks: list,
    batch: Batch,
    *,
    batching: MicroBatching,
    vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """Per-token log-probs [B, S] of ``batch`` under the model (old or reference); on the last stage, else None.

    Positions past a row's sample hold zeros.
    """
    return forward_rows(model_chunks, batch, batching,
                        lambda micro, logits: _logprobs(micro, logits, vocab_size, temperature)[0])


def forward_rows(model_chunks: list, batch: Batch, batching: MicroBatching,
                 rows_of: Callable[[MicroBatch, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """A forward pass without gradients: ``rows_of(micro, output)`` [n, L] for every micro-batch, gathered into
    [B, S] in ``batch``'s row order (zeros outside each sample); on the last stage, else None."""

    def step(data_iterator: Iterator, model):
        micro: MicroBatch = next(data_iterator)
        out = model(**micro.model_inputs(with_prompt_mask=False))

        def collect(output):
            rows = rows_of(micro, output)
            return rows.sum() * 0, torch.tensor(1, dtype=torch.int), {"rows": rows.detach()}

        return out, collect

    batches = micro_batches(batch, batching)
    with torch.no_grad():
        per_mb = run_schedule(model_chunks, batches, step, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    out = torch.zeros(batch.tokens.shape, device=device())
    for micro, d in zip(batches, per_mb, strict=True):
        rows = d["rows"] * micro.rows.prompt_mask.logical_or(micro.rows.response_mask)
        out[micro.index.to(out.device), : rows.shape[1]] = rows
    return out


def reduce_stats(per_mb: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum (or max) micro-batch stats, reduce over data-parallel ranks, share from the last stage, divide.

    A stat is a scalar, except ``grp/`` stats: one value per prompt group of the global batch (summed).
    """
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    is_last = parallel_state.is_pipeline_last_stage()
    shapes = [{k: v.numel() for d in per_mb for k, v in d.items()} if is_last else None]
    dist.broadcast_object_list(shapes, src=last, group=pp_group)
    names = sorted(shapes[0])
    sizes = [shapes[0][n] for n in names]
    values = torch.zeros(sum(sizes), device=device())
    if is_last:
        is_max = torch.cat([torch.full((size,), n.startswith("max/")) for n, size in zip(names, sizes, strict=True)])
        is_max = is_max.to(values.device)
        parts = []
        for name in names:
            v = torch.stack([d[name].detach().float().reshape(-1).to(values.device) for d in per_mb])
            parts.append(v.max(0).values if name.startswith("max/") else v.sum(0))
        values = torch.cat(parts)
        maxima = values.clone()
        dist.all_reduce(values, group=dp_group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=dp_group)
        values = torch.where(is_max, maxima, values)
    dist.broadcast(values, src=last, group=pp_group)
    totals = dict(zip(names, values.split(sizes), strict=True))
    counts = {kind: max(totals[f"count/{name}"].item(), 1) if f"count/{name}" in totals else 1
              for kind, name in (("seq", "sequences"), ("tok", "tokens"), ("mis", "mismatch_tokens"))}
    out: dict[str, float] = {}
    for key, v in totals.items():
        kind, name = key.split("/", 1)
        if kind in counts:
            out[name] = v.item() / counts[kind]
        elif kind == "max":
            out[name + "_max"] = v.item()
        elif kind != "grp":
            out[key] = v.item()
    if "residual_sq" in out:  # FlowRL: report the residual's spread, not its raw second moment
        out["residual_std"] = max(out.pop("residual_sq") - out["residual"] ** 2, 0.0) ** 0.5
    if "grp/residual" in totals:  # FlowRL: log Z minus the value that zeroes each group's mean residual
        seen = totals["grp/count"] > 0
        gap = totals["grp/residual"][seen] / totals["grp/count"][seen]
        out["log_z_gap"] = gap.abs().mean().item() if seen.any() else 0.0
    return out

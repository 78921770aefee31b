"""Policy updates and log-prob passes through megatron-core's pipeline schedule.

A batch is a dict of tensors for this data-parallel rank, rows = samples (prompt then
response, right-padded), token-aligned: position t of ``*_logprobs`` holds log p(token_t | <t).

    tokens         [B, S] long
    prompt_mask    [B, S] bool   the prompt's tokens (Z-head pooling)
    response_mask  [B, S] bool   the response's tokens (the loss)
    advantages     [B]    float  normalised rewards
    old_logprobs   [B, S] float  policy that sampled (importance weights); absent: on-policy, w = 1
    ref_logprobs   [B, S] float  frozen reference; absent: zeros (GRPO without a KL term)
    rollout_logprobs [B, S] float  the engines' log-probs; present: train-vs-rollout mismatch is reported
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from flowrl_megatron.algorithms.logprobs import megatron_logprobs
from flowrl_megatron.algorithms.losses import AlgorithmConfig, LossInputs, policy_loss
from flowrl_megatron.runtime import device
from flowrl_megatron.training.micro_batches import MicroBatch, MicroBatching, micro_batches


def token_logprobs(logits, tokens, vocab_size: int, temperature: float):
    """Log-prob of token t from the logits at t-1, placed at position t (position 0 is 0).

    The targets are shifted rather than the logits sliced, which would copy all logits.
    """
    next_tokens = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # the last position's target is unused
    lp, ent = megatron_logprobs(logits, next_tokens, vocab_size, temperature)
    pad = lp.new_zeros(lp.shape[0], 1)
    return torch.cat([pad, lp[:, :-1]], dim=1), torch.cat([pad, ent[:, :-1]], dim=1)


def _logprobs(micro: MicroBatch, logits, vocab_size: int, temperature: float):
    """Token-aligned log-probs and entropies of the micro-batch's samples, as rows [n, L]."""
    lp, ent = token_logprobs(logits, micro.pack(micro.rows["tokens"]), vocab_size, temperature)
    return micro.to_rows(lp), micro.to_rows(ent)


def _run(model_chunks, batches: list[MicroBatch], step_fn, forward_only: bool) -> list:
    """megatron-core's schedule over ``batches``; their shapes vary, which pipeline stages exchange first
    (``variable_seq_lengths``), so the shapes given here matter to nothing."""
    n, width = batches[0].rows["tokens"].shape
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
    batch: dict[str, torch.Tensor],
    cfg: AlgorithmConfig,
    *,
    batching: MicroBatching,
    vocab_size: int,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Accumulate the loss gradient of ``batch`` (this DP rank's part of the global batch).

    The loss is a sum over units divided by the number of units in the whole global batch
    (``calculate_per_token_loss``), so gradients do not depend on how the batch is split.
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
                old_logprobs=mb["old_logprobs"] if "old_logprobs" in mb else lp.detach(),  # on-policy: w = 1
                ref_logprobs=mb["ref_logprobs"] if "ref_logprobs" in mb else torch.zeros_like(lp),
                response_mask=mb["response_mask"], advantages=mb["advantages"], log_z=log_z,
            ))
            mask = mb["response_mask"]
            if "rollout_logprobs" in mb:  # weights the engines sampled with: their log-probs must agree
                diff = lp.detach() - mb["rollout_logprobs"]
                stats["tok/mismatch_abs_diff"] = (diff.abs() * mask).sum()
                stats["tok/mismatch_prob_ratio"] = (diff.exp() * mask).sum()
                stats["max/mismatch_abs_diff"] = (diff.abs() * mask).max()
            stats["count/sequences"] = torch.tensor(float(lp.shape[0]))
            stats["count/tokens"] = mask.sum().float()
            stats["count/sample_tokens"] = micro.lengths.sum().float()
            stats["count/model_tokens"] = torch.tensor(float(micro.tokens))
            stats["count/micro_batches"] = torch.tensor(1.0)
            return total, count, stats

        return out, loss_func

    per_mb = _run(model_chunks, micro_batches(batch, batching), step, forward_only=False)
    return reduce_stats(per_mb)


def forward_logprobs(
    model_chunks: list,
    batch: dict[str, torch.Tensor],
    *,
    batching: MicroBatching,
    vocab_size: int,
    temperature: float = 1.0,
) -> torch.Tensor | None:
    """Per-token log-probs [B, S] of ``batch`` under the model (old or reference); on the last stage, else None.

    Positions past a row's sample hold zeros.
    """

    def step(data_iterator: Iterator, model):
        micro: MicroBatch = next(data_iterator)
        out = model(**micro.model_inputs(with_prompt_mask=False))

        def collect(output):
            lp, _ = _logprobs(micro, output, vocab_size, temperature)
            return lp.sum() * 0, torch.tensor(1, dtype=torch.int), {"logprobs": lp.detach()}

        return out, collect

    batches = micro_batches(batch, batching)
    with torch.no_grad():
        per_mb = _run(model_chunks, batches, step, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    out = torch.zeros(batch["tokens"].shape, device=device())
    for micro, d in zip(batches, per_mb, strict=True):
        lp = d["logprobs"] * micro.rows["prompt_mask"].logical_or(micro.rows["response_mask"])
        out[micro.index.to(out.device), : lp.shape[1]] = lp
    return out


def reduce_stats(per_mb: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum (or max) micro-batch stats, reduce over data-parallel ranks, share from the last stage, divide."""
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    is_last = parallel_state.is_pipeline_last_stage()
    keys = [sorted({k for d in per_mb for k in d}) if is_last else None]
    dist.broadcast_object_list(keys, src=last, group=pp_group)
    names: list[str] = keys[0]
    values = torch.zeros(len(names), device=device())
    if is_last:
        is_max = torch.tensor([n.startswith("max/") for n in names], device=values.device)
        for i, name in enumerate(names):
            v = torch.stack([d[name].detach().float().reshape(()).to(values.device) for d in per_mb])
            values[i] = v.max() if is_max[i] else v.sum()
        maxima = values.clone()
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        values = torch.where(is_max, maxima, values)
    dist.broadcast(values, src=last, group=pp_group)
    totals = dict(zip(names, values.tolist(), strict=True))
    out: dict[str, float] = {}
    for key, v in sorted(totals.items()):
        kind, name = key.split("/", 1)
        if kind == "seq":
            out[name] = v / max(totals["count/sequences"], 1)
        elif kind == "tok":
            out[name] = v / max(totals["count/tokens"], 1)
        elif kind == "max":
            out[name + "_max"] = v
        else:
            out[key] = v
    if "residual_sq" in out:  # FlowRL: report the residual's spread, not its raw second moment
        out["residual_std"] = max(out.pop("residual_sq") - out["residual"] ** 2, 0.0) ** 0.5
    return out

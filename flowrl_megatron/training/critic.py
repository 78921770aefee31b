"""PPO's critic in training: its value model, optimizer and schedule, the value pass that gives GAE its values, and
the value-loss update. It is trained beside the policy on the same mini-batches and never leaves the trainer: the
weight sync and the Hugging Face export read the policy only."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from flowrl_megatron.algorithms.advantages import gae, whiten
from flowrl_megatron.algorithms.losses import value_loss
from flowrl_megatron.checkpoint import load_model_weights
from flowrl_megatron.config import AlgorithmConfig, CriticConfig, TrainConfig
from flowrl_megatron.models.arch import ModelArch
from flowrl_megatron.models.gpt import build_gpt_model
from flowrl_megatron.models.value import VALUE_HEAD_PREFIX
from flowrl_megatron.training.batch import Batch
from flowrl_megatron.training.micro_batches import MicroBatch, MicroBatching, micro_batches
from flowrl_megatron.training.parallel import build_lr_scheduler, build_optimizer, wrap_ddp
from flowrl_megatron.training.step import forward_rows, reduce_stats, run_schedule, token_aligned


@dataclass
class Critic:
    model: torch.nn.Module  # models.value.ValueModel: this rank's stage
    ddp: Any
    optimizer: Any
    scheduler: Any
    value_clip: float

    @classmethod
    def build(cls, arch: ModelArch, cfg: CriticConfig, train: TrainConfig, dtype: torch.dtype, attention: str,
              init_checkpoint: str | Path, total_updates: int) -> Critic:
        """The value model from the policy's converted checkpoint (its value head freshly initialised), with its own
        AdamW at ``cfg.lr`` and the policy's warm-up, weight decay and gradient clip."""
        model = build_gpt_model(arch, dtype, calculate_per_token_loss=True, recompute=train.recompute == "full",
                                attention=attention, value_head=True)
        load_model_weights(model, init_checkpoint, new_prefixes=(VALUE_HEAD_PREFIX,))
        return cls.around(model, cfg, train, dtype, total_updates)

    @classmethod
    def around(cls, model: torch.nn.Module, cfg: CriticConfig, train: TrainConfig, dtype: torch.dtype,
               total_updates: int) -> Critic:
        """The optimizer and schedule ``build`` gives, around a value model whose weights are already set."""
        ddp = wrap_ddp(model)
        optimizer = build_optimizer([ddp], lr=cfg.lr, weight_decay=train.weight_decay, clip_grad=train.grad_clip,
                                    bf16=dtype == torch.bfloat16)
        scheduler = build_lr_scheduler(optimizer, lr=cfg.lr, warmup_steps=train.warmup_steps,
                                       total_steps=total_updates, weight_decay=train.weight_decay)
        return cls(model, ddp, optimizer, scheduler, cfg.value_clip)

    def values(self, batch: Batch, batching: MicroBatching) -> torch.Tensor | None:
        """[B, S] V(state before token t) at position t, token-aligned like the log-probs; last stage, else None."""
        return forward_rows([self.ddp], batch, batching, lambda micro, v: micro.to_rows(token_aligned(v)))

    def set_advantages(self, batch: Batch, rewards: torch.Tensor, algo: AlgorithmConfig,
                       batching: MicroBatching) -> None:
        """``batch``'s values, GAE advantages and returns from the current critic (on the last stage, where the
        loss reads them), whitened over the samples in the loss of every data-parallel rank's share."""
        values = self.values(batch, batching)
        if values is None:
            return
        values = values.cpu()
        advantages, returns = gae(rewards, values, batch.response_mask, algo.gamma, algo.lam)
        if algo.whiten_advantages:
            advantages = whiten(advantages, batch.loss_mask(), parallel_state.get_data_parallel_group())
        batch.values, batch.returns, batch.advantages = values, returns, advantages

    def forward_backward(self, batch: Batch, batching: MicroBatching) -> dict[str, float]:
        """Accumulate the value loss's gradient over ``batch`` (this rank's part of a mini-batch), token-mean over the
        whole mini-batch; its global statistics."""

        def step(data_iterator: Iterator, model):
            micro: MicroBatch = next(data_iterator)
            out = model(**micro.model_inputs(with_prompt_mask=False))
            rows = micro.rows

            def loss_func(output):
                mask = rows.loss_mask()
                values = micro.to_rows(token_aligned(output))
                total, count, stats = value_loss(self.value_clip, values, rows.values, rows.returns, mask)
                stats["count/tokens"] = mask.sum().float()
                return total, count, stats

            return out, loss_func

        stats = reduce_stats(run_schedule([self.ddp], micro_batches(batch, batching), step, forward_only=False))
        return {k: v for k, v in stats.items() if not k.startswith("count/")}

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> float:
        """One optimizer and schedule step; the gradient norm before clipping."""
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return float(grad_norm or 0.0)

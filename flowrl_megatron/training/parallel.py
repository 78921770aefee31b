"""Wrap a Megatron model for data-parallel training and build its optimizer."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import ParamGroupOverride


def wrap_ddp(model: torch.nn.Module, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP with fp32 gradient buffers, and the schedule hooks that finish gradient reduction."""
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
        ),
        module=model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(
    model_chunks: list[DistributedDataParallel],
    *,
    lr: float,
    weight_decay: float = 0.1,
    clip_grad: float = 1.0,
    z_head_lr_mult: float = 1.0,
    use_distributed_optimizer: bool = False,
    bf16: bool = False,
    adam_betas: tuple[float, float] = (0.9, 0.999),
):
    """AdamW for the policy and its Z head together (as the authors train them), Z head lr scaled."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        adam_beta1=adam_betas[0],
        adam_beta2=adam_betas[1],
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    overrides: dict[ParamKey, ParamGroupOverride] = {}
    if z_head_lr_mult != 1.0:
        is_z_head = ParamWithNamePredicate(name="z_head", fn=lambda param, name: "z_head." in name)
        overrides[ParamKey(with_name_predicate=is_z_head)] = ParamGroupOverride(
            max_lr=lr * z_head_lr_mult, min_lr=lr * z_head_lr_mult
        )
    return get_megatron_optimizer(config=config, model_chunks=model_chunks, config_overrides=overrides or None)


def build_lr_scheduler(optimizer, *, lr: float, warmup_steps: int, total_steps: int, weight_decay: float = 0.1):
    """Linear warm-up from 0, then constant (the paper's schedule). Applies per-group ``max_lr`` overrides."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=max(total_steps, warmup_steps + 1),
        lr_decay_style="constant",
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )

"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

from pathlib import Path


def z_head_learning_rates(ckpt: str, lr_mult: float) -> dict:
    """Learning rates of the optimizer's param groups after warm-up, split by Z head / rest."""
    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.config import ZHeadConfig
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.parallel import build_lr_scheduler, build_optimizer, wrap_ddp

    init_model_parallel(ParallelLayout())
    model = build_gpt_model(load_arch(Path(ckpt) / "hf"), z_head=ZHeadConfig(lr_mult=lr_mult),
                            calculate_per_token_loss=True)
    load_model_weights(model, ckpt, new_prefixes=("z_head.",))
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], lr=1e-3, z_head_lr_mult=lr_mult)
    scheduler = build_lr_scheduler(optimizer, lr=1e-3, warmup_steps=2, total_steps=10)
    scheduler.step(increment=2)
    z_params = {id(p) for p in model.z_head.parameters()}
    rates: dict[str, set] = {"z_head": set(), "rest": set()}
    for group in optimizer.param_groups:
        kind = "z_head" if any(id(p) in z_params for p in group["params"]) else "rest"
        assert all((id(p) in z_params) == (kind == "z_head") for p in group["params"])
        rates[kind].add(round(group["lr"], 12))
    return {k: sorted(v) for k, v in rates.items()}


def nonfinite_updates(ckpt: str) -> dict:
    """Two data-parallel ranks; gradients made non-finite on rank 1 only, then a non-finite loss statistic."""
    import torch.distributed as dist

    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.nonfinite import NonFiniteError, NonFiniteGuard
    from flowrl_megatron.training.parallel import wrap_ddp

    init_model_parallel(ParallelLayout())
    ddp = wrap_ddp(build_gpt_model(load_arch(Path(ckpt) / "hf"), calculate_per_token_loss=True))
    params = [p for p in ddp.parameters()]
    guard = NonFiniteGuard(stop_after=2)
    out: dict = {}
    for p in params:
        p.main_grad.fill_(0.5)
    out["finite"] = guard.check({"loss": 1.0}, [ddp], step=1)
    if dist.get_rank() == 1:
        params[3].main_grad.view(-1)[7] = float("inf")
    out["gradient"] = guard.check({"loss": 1.0}, [ddp], step=2)
    for p in params:
        p.main_grad.fill_(0.5)
    out["recovered"] = guard.check({"loss": 1.0}, [ddp], step=3)
    out["again"] = guard.check({"loss": 1.0, "residual": float("nan")}, [ddp], step=4)
    try:
        guard.check({"loss": float("nan")}, [ddp], step=5)
    except NonFiniteError as e:
        out["error"] = str(e)
    out["skipped"] = guard.skipped
    return out

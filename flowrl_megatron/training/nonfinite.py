"""Updates whose loss or gradient is not finite are skipped, not applied: one NaN would poison every weight and the
Adam moments with it. A few in a row mean the run itself is broken, so it stops, saying where and what."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flowrl_megatron.runtime.distributed import device


class NonFiniteError(RuntimeError):
    """Too many non-finite updates in a row."""


def _gradient(param: torch.nn.Parameter) -> torch.Tensor | None:
    """Megatron's DDP accumulates into ``main_grad``; a plain module into ``grad``."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def first_nonfinite(stats: dict[str, float], model_chunks: list) -> str | None:
    """The first non-finite quantity of an update, the same answer on every rank: a loss statistic by name (they are
    global already), else ``"gradient"`` when any rank's gradient shard holds a NaN or an infinity."""
    for name, value in stats.items():
        if not math.isfinite(value):
            return name
    grads = [g for chunk in model_chunks for p in chunk.parameters() if (g := _gradient(p)) is not None]
    bad = torch.zeros(1, device=device())
    if grads:
        bad[0] = torch.stack([torch.isfinite(g).all() for g in grads]).logical_not().any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every tensor-, pipeline- and data-parallel shard
    return "gradient" if bad.item() else None


@dataclass
class NonFiniteGuard:
    """``check`` before each optimizer step: apply it, or skip it; at ``stop_after`` in a row, stop."""

    stop_after: int
    in_a_row: int = 0
    skipped: int = 0  # since the run started

    def check(self, stats: dict[str, float], model_chunks: list, step: int) -> bool:
        what = first_nonfinite(stats, model_chunks)
        if what is None:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.stop_after:
            raise NonFiniteError(
                f"{self.in_a_row} updates in a row were not finite, the last at step {step} (first non-finite: "
                f"{what}); the run stops before they reach the weights. Lower train.lr or train.grad_clip, check "
                "this step's rewards and data, or resume from the last checkpoint.")
        return False

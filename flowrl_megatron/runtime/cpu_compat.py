"""Make megatron-core run on CPU with gloo.

megatron-core hard-codes CUDA in many places (``device="cuda"``, ``.cuda()``, CUDA RNG
state, ``torch.cuda.current_device()``). Rather than forking it, this module redirects
those calls to the CPU while it is installed. Everything here is a no-op when CUDA is
available: on a GPU the real CUDA paths run untouched.

What is redirected, and why each is needed (each was needed to run GPTModel, the
pipeline schedule, DDP, the (distributed) optimizer and dist_checkpointing on gloo):

1. A ``TorchFunctionMode`` rewrites any ``device=`` argument naming CUDA to CPU, makes
   ``Tensor.cuda()`` the identity, rewrites ``Tensor.to(<cuda device>)``, drops
   ``pin_memory=True`` and makes ``Tensor.type()`` report ``torch.cuda.*Tensor`` names,
   because the Megatron optimizer asserts on those names.
2. ``torch.cuda.current_device``/``manual_seed``/``get_rng_state``/``set_rng_state``/
   ``synchronize`` act on the CPU generator and device.
3. Megatron's CUDA RNG tracker helpers act on the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and dropout inside TP regions work.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes bare ints (``torch.cuda.current_device()``) as device ids.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call made inside it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_CPU if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            name = func(*args, **kwargs)
            return name.replace("torch.", "torch.cuda.", 1) if name.count(".") == 1 else name
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU  # type: ignore[assignment]
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # type: ignore[assignment]
    cuda.manual_seed_all = cuda.manual_seed  # type: ignore[assignment]
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()  # type: ignore[assignment]
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)  # type: ignore[assignment]
    cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    cuda.set_device = lambda device: None  # type: ignore[assignment]


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def install() -> bool:
    """Install the CPU layer if CUDA is unavailable. Returns whether it is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        _patch_torch_cuda()
        _patch_megatron_rng()
        _CudaToCpuMode().__enter__()
        _installed = True
    return True


def is_active() -> bool:
    return _installed

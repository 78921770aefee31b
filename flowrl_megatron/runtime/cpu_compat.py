"""Make megatron-core run on CPU with gloo.

megatron-core hard-codes CUDA in many places (``device="cuda"``, ``.cuda()``, CUDA RNG
state, ``torch.cuda.current_device()``). Rather than forking it, this module redirects
those calls to the CPU while it is installed. Everything here is a no-op when CUDA is
available: on a GPU the real CUDA paths run untouched.

What is redirected, and why each is needed (each was needed to run GPTModel, the
pipeline schedule, DDP, the (distributed) optimizer and dist_checkpointing on gloo):

1. torch's tensor factories (``torch.zeros(..., device="cuda")`` and the rest of ``FACTORIES``,
   ``Tensor.new_*``) and ``Tensor.to`` create on the CPU what is asked for on a CUDA device;
   ``Tensor.cuda()`` and ``Tensor.pin_memory()`` are the identity, ``pin_memory=True`` is dropped, and
   ``Tensor.type()`` reports ``torch.cuda.*Tensor`` names, because the Megatron optimizer asserts on those
   names. Only these calls are wrapped: a ``TorchFunctionMode`` would do the same for every torch call, through a
   Python dispatch on every operation (about 1,770 of them per step of the enumerable toy).
2. ``torch.cuda.current_device``/``manual_seed``/``get_rng_state``/``set_rng_state``/
   ``synchronize`` act on the CPU generator and device.
3. Megatron's CUDA RNG tracker helpers act on the CPU generator, so
   ``model_parallel_cuda_manual_seed`` and dropout inside TP regions work.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_CPU = torch.device("cpu")
_installed = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes bare ints (``torch.cuda.current_device()``) as device ids.
    return isinstance(device, int) and not isinstance(device, bool)


FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "range", "rand", "randn", "randint",
             "randperm", "linspace", "logspace", "eye", "empty_like", "zeros_like", "ones_like", "full_like",
             "rand_like", "randn_like", "randint_like", "empty_strided", "scalar_tensor")
TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def create(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return create


def _patch_tensor_creation() -> None:
    for name in FACTORIES:
        setattr(torch, name, _on_cpu(getattr(torch, name)))
    for name in TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _on_cpu(getattr(torch.Tensor, name)))
    to, type_ = torch.Tensor.to, torch.Tensor.type

    @functools.wraps(to)
    def to_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args and _is_cuda_device(args[0]):
            args = (_CPU, *args[1:])
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return to(self, *args, **kwargs)

    @functools.wraps(type_)
    def cuda_type_name(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = type_(self, *args, **kwargs)
        if args or kwargs or out.count(".") != 1:  # a conversion, or already a non-default type name
            return out
        return out.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.to = to_cpu  # type: ignore[method-assign]
    torch.Tensor.type = cuda_type_name  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


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
        _patch_tensor_creation()
        _installed = True
    return True


def is_active() -> bool:
    return _installed

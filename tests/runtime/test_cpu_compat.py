"""The CPU layer redirects megatron-core's CUDA calls on CPU and does nothing where CUDA exists."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.runtime import backend, cpu_compat, device
from tests.distributed import run_distributed


@pytest.mark.distributed
def test_cuda_requests_run_on_cpu():
    (r,) = run_distributed("tests.runtime.workers:cpu_layer_behaviour", 1)
    assert r["active"] is True
    assert r["devices"] == ["cpu"] * 8
    assert r["type_name"] == "torch.cuda.FloatTensor"  # the Megatron optimizer asserts on this
    assert r["converted"] == [True, True]  # .type(dtype) and .to(dtype=) still convert
    assert r["current_device"] == "cpu"
    assert r["tracker_streams_differ"] and r["cuda_seed_reproducible"]


def test_is_a_no_op_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current_device = torch.cuda.current_device
    assert cpu_compat.install() is False
    assert torch.cuda.current_device is current_device
    assert backend() == "nccl"
    assert device().type == "cuda"


def test_device_and_backend_on_this_machine():
    if torch.cuda.is_available():
        pytest.skip("this test describes the CPU machines")
    assert backend() == "gloo" and device() == torch.device("cpu")

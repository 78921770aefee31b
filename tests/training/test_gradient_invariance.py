"""One global batch gives the same loss and gradients whatever the TP/PP/DP layout and micro-batching, and with
full activation recompute."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed

# (tp, pp, dp, micro-batch size, full recompute) for a global batch of 8 sequences.
LAYOUTS = [(1, 1, 1, 8, False), (2, 1, 1, 2, False), (1, 2, 1, 1, False), (1, 1, 2, 2, False), (2, 2, 1, 4, False),
           (2, 2, 1, 4, True)]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tiny_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    ckpt = hf_to_megatron(tiny_untied, root / "ckpt")
    out = {}
    for tp, pp, dp, mbs, recompute in LAYOUTS:
        path = root / f"tp{tp}_pp{pp}_dp{dp}_recompute{recompute}.pt"
        run_distributed("tests.algorithms.workers:policy_gradients", tp * pp * dp, ckpt=str(ckpt), tp=tp, pp=pp,
                        micro_batch_size=mbs, out=str(path), recompute=recompute)
        out[(tp, pp, dp, mbs, recompute)] = torch.load(path, weights_only=False)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", ["flowrl", "grpo"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=lambda layout: "tp{}_pp{}_dp{}_mbs{}_recompute{}".format(*layout))
def test_same_loss_and_gradients_as_single_process(results, algorithm, layout):
    base, other = results[LAYOUTS[0]][algorithm], results[layout][algorithm]
    assert base["stats"].keys() == other["stats"].keys()
    for k, v in base["stats"].items():
        assert other["stats"][k] == pytest.approx(v, abs=TOL, rel=TOL), k
    assert base["grads"].keys() == other["grads"].keys()
    z_grad = max(g.abs().max().item() for k, g in base["grads"].items() if k.startswith("z_head."))
    assert (z_grad > 1e-3) if algorithm == "flowrl" else (z_grad == 0.0)  # only FlowRL trains the Z head
    for name, g in base["grads"].items():
        assert (other["grads"][name] - g).abs().max().item() <= TOL, name
    assert max(g.abs().max().item() for g in base["grads"].values()) > 1e-3  # gradients are not trivially zero

"""One global batch gives the same loss and gradients whatever the TP/PP/DP layout and micro-batching (fixed rows,
by token budget, packed into THD rows), and with full activation recompute; for PPO also the critic's values, the
GAE advantages whitened over the data-parallel ranks, and the critic's value-loss gradients. Packed micro-batches
also give the same per-token log-probs and per-sample log Z as padded rows."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed

# (tp, pp, dp, micro-batch size, token budget, packed, attention, full recompute) for a global batch of 8
# sequences of 5 to 12 tokens (68 in all). The budgets make 2 or 3 micro-batches per rank.
LAYOUTS = [(1, 1, 1, 8, 0, False, "default", False), (2, 1, 1, 2, 0, False, "default", False),
           (1, 2, 1, 1, 0, False, "default", False), (1, 1, 2, 2, 0, False, "default", False),
           (2, 2, 1, 4, 0, False, "default", False), (2, 2, 1, 4, 0, False, "default", True),
           (1, 1, 1, 8, 0, False, "sdpa", False), (1, 1, 1, 0, 30, True, "sdpa", False),
           (2, 2, 1, 0, 24, True, "sdpa", False),
           (1, 1, 2, 0, 40, False, "default", False)]
TOL = 1e-5
VARIANT = ("micro_batch_size", "max_tokens", "packed", "attention", "recompute")  # LAYOUTS[i][3:]


@pytest.fixture(scope="module")
def results(tiny_untied, tmp_path_factory):
    """Every layout's results; one torchrun per world size, whose processes run each of its TP x PP x DP layouts in
    turn and all of their variants."""
    root = tmp_path_factory.mktemp("invariance")
    ckpt = hf_to_megatron(tiny_untied, root / "ckpt")
    out = {}
    rows: dict[tuple, list[tuple]] = {}  # (tp, pp, dp) -> its LAYOUTS
    for layout in LAYOUTS:
        rows.setdefault(layout[:3], []).append(layout)
    for world in dict.fromkeys(tp * pp * dp for tp, pp, dp in rows):
        launched = {(tp, pp, dp): mine for (tp, pp, dp), mine in rows.items() if tp * pp * dp == world}
        path = root / f"world{world}.pt"
        run_distributed("tests.algorithms.workers:policy_gradients", world, ckpt=str(ckpt), out=str(path),
                        layouts=[[tp, pp, [dict(zip(VARIANT, layout[3:], strict=True)) for layout in mine]]
                                 for (tp, pp, _), mine in launched.items()])
        for mine, got in zip(launched.values(), torch.load(path, weights_only=True), strict=True):
            out.update(zip(mine, got, strict=True))
    return out


def layout_id(layout: tuple) -> str:
    return "tp{}_pp{}_dp{}_mbs{}_tokens{}_packed{}_{}_recompute{}".format(*layout)


@pytest.mark.distributed
@pytest.mark.parametrize("algorithm", ["flowrl", "grpo", "gspo"])
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=layout_id)
def test_same_loss_and_gradients_as_single_process(results, algorithm, layout):
    base, other = results[LAYOUTS[0]][algorithm], results[layout][algorithm]
    assert base["stats"].keys() == other["stats"].keys()
    for k, v in base["stats"].items():
        if k not in ("count/model_tokens", "count/micro_batches"):  # what the layouts differ in
            assert other["stats"][k] == pytest.approx(v, abs=TOL, rel=TOL), k
    assert base["grads"].keys() == other["grads"].keys()
    z_grad = max(g.abs().max().item() for k, g in base["grads"].items() if k.startswith("z_head."))
    assert (z_grad > 1e-3) if algorithm == "flowrl" else (z_grad == 0.0)  # only FlowRL trains the Z head
    for name, g in base["grads"].items():
        assert (other["grads"][name] - g).abs().max().item() <= TOL, name
    assert max(g.abs().max().item() for g in base["grads"].values()) > 1e-3  # gradients are not trivially zero


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=layout_id)
def test_ppo_policy_and_critic_gradients_equal_single_process(results, layout):
    base, other = results[LAYOUTS[0]]["ppo"], results[layout]["ppo"]
    assert base["stats"].keys() == other["stats"].keys()
    assert {"value_loss", "value", "return", "value_clip_fraction", "loss", "clip_fraction"} <= base["stats"].keys()
    for k, v in base["stats"].items():
        if k not in ("count/model_tokens", "count/micro_batches"):
            assert other["stats"][k] == pytest.approx(v, abs=TOL, rel=TOL), k
    for part in ("grads", "critic_grads"):
        assert base[part].keys() == other[part].keys()
        assert max(g.abs().max().item() for g in base[part].values()) > 1e-3, part
        for name, g in base[part].items():
            assert (other[part][name] - g).abs().max().item() <= TOL, (part, name)
    head = base["critic_grads"]["output_layer.weight"]
    assert head.shape[0] == 1 and head.abs().max() > 1e-3  # the value head: one output, trained
    assert all(g.abs().max() == 0 for k, g in base["grads"].items() if k.startswith("z_head."))  # no log Z in PPO


@pytest.mark.distributed
def test_packed_log_probs_and_log_z_equal_padded_rows(results):
    """The same samples, one per padded row or end to end in THD rows (the same SDPA attention): the same
    log-probs and log Z per sample. Bit-identical on the Intel CPUs this was first run on; on AMD EPYC, torch's
    CPU attention kernels sum in another order for other sequence lengths (seen: up to 1e-6 apart)."""
    padded, packed = results[LAYOUTS[6]], results[LAYOUTS[7]]
    mask = packed["logprobs"] != 0
    assert mask.sum() == 68 - 8  # every token but each sample's first has a log-prob
    assert (packed["logprobs"] - padded["logprobs"]).abs().max() <= TOL / 5
    assert padded["log_z"].std() > 1e-3  # samples with different prompts get different log Z
    assert (packed["log_z"] - padded["log_z"]).abs().max() <= TOL / 5
    assert packed["flowrl"]["stats"]["count/model_tokens"] == 68  # no padding
    assert padded["flowrl"]["stats"]["count/model_tokens"] == 8 * 12  # every row as long as the longest

"""The one Megatron <-> HF mapping: exact inverses, and agreement with megatron-core's own layout."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.conversion.mapping import (
    EXTRA_STATE_MODULES,
    checkpoint_chunks,
    global_shape,
    megatron_shape,
    to_hf,
    to_megatron,
    tp_merge,
    tp_shard,
    weight_rules,
)
from flowrl_megatron.models.arch import load_arch
from tests.distributed import run_distributed


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied", "tiny_qwen3"])
def test_to_hf_inverts_to_megatron_and_tp_merge_inverts_tp_shard(fixture, request):
    arch = load_arch(request.getfixturevalue(fixture))
    g = torch.Generator().manual_seed(0)
    for rule in weight_rules(arch):
        shape = megatron_shape(rule, arch)
        full = torch.randn(shape, generator=g)
        if rule.kind == "vocab":
            full[arch.vocab_size :] = 0  # padding rows are zeros by construction
        hf = to_hf(rule, arch, full)
        assert len(hf) == len(rule.hf)
        assert torch.equal(to_megatron(rule, arch, hf), full), rule.key
        for tp in (1, 2):
            shards = [tp_shard(rule, full, tp, r) for r in range(tp)]
            assert torch.equal(tp_merge(rule, shards), full), (rule.key, tp)


@pytest.mark.parametrize("fixture", ["tiny_untied", "tiny_tied", "tiny_llama", "tiny_qwen3"])
def test_hf_metadata_names_every_checkpoint_tensor_once_with_its_shape(fixture, request):
    """What weight-sync receivers size their buffers from must be exactly the HF checkpoint's tensors."""
    from safetensors import safe_open

    from flowrl_megatron.conversion.gather import hf_metadata

    model_dir = request.getfixturevalue(fixture)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        expected = {k: f.get_slice(k).get_shape() for k in f.keys()}
    meta = hf_metadata(load_arch(model_dir))
    assert len(meta) == len(expected)
    assert {n: list(s) for n, s in meta} == expected


def test_qkv_is_interleaved_per_query_group(tiny_untied):
    arch = load_arch(tiny_untied)  # 4 query heads of 32, 2 KV heads
    (rule,) = [r for r in weight_rules(arch) if r.key.endswith("linear_qkv.weight")]
    d, h = arch.head_dim, arch.hidden_size
    q = torch.arange(4 * d).float()[:, None].expand(-1, h)
    k = 1000 + torch.arange(2 * d).float()[:, None].expand(-1, h)
    v = 2000 + torch.arange(2 * d).float()[:, None].expand(-1, h)
    rows = to_megatron(rule, arch, [q, k, v])[:, 0]
    group0 = torch.cat([q[: 2 * d, 0], k[:d, 0], v[:d, 0]])
    assert torch.equal(rows[: 4 * d], group0)
    # TP rank 1 holds exactly query group 1: its two query heads, its key and its value.
    assert torch.equal(tp_shard(rule, rows, 2, 1), torch.cat([q[2 * d :, 0], k[d:, 0], v[d:, 0]]))


FAMILIES = ["tiny_untied", "tiny_tied", "tiny_llama", "tiny_qwen3"]


@pytest.mark.distributed
def test_mapping_matches_megatron_sharded_state_dict(request):
    """Keys, global shapes and stored pieces equal what a real GPTModel at TP2 x PP2 declares, for every family."""
    dirs = [request.getfixturevalue(f) for f in FAMILIES]
    per_rank = run_distributed("tests.models.workers:sharded_layouts", 4, config_dirs=[str(d) for d in dirs], tp=2,
                               pp=2)
    for i, (fixture, model_dir) in enumerate(zip(FAMILIES, dirs, strict=True)):
        arch = load_arch(model_dir)
        megatron: dict[str, set] = {}
        for found in (rank[i] for rank in per_rank):
            for key, entries in found.items():
                megatron.setdefault(key, set()).update(tuple(map(tuple, e)) if e != "object" else e for e in entries)
        objects = {k for k in megatron if "/shard_" in k}
        assert objects == {
            f"decoder.layers.{m}._extra_state/shard_{i}_{arch.num_layers}"
            for m in EXTRA_STATE_MODULES
            for i in range(arch.num_layers)
        }, fixture
        rules = weight_rules(arch)
        assert set(megatron) - objects == {r.key for r in rules}, fixture
        for rule in rules:
            ours = {(global_shape(rule, arch), c.offsets, c.sizes) for c in checkpoint_chunks(rule, arch, tp=2)}
            assert megatron[rule.key] == ours, (fixture, rule.key)

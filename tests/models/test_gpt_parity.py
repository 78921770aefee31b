"""Megatron GPTModel (real megatron-core on gloo) vs transformers on the same tokens and weights."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed

# 160 positions: 2.5 times the tiny Llama's original context (64), where its llama3 RoPE scaling matters.
TOKENS = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(0)).tolist()
TOLERANCE = 1e-4
# Which families each layout is checked on (one launch per layout): every family at TP1, TP2 and PP2; TP2 x PP2
# for the families with a layout of their own (tied embeddings, query/key norms).
LAYOUTS = {
    (1, 1): ["tiny_untied", "tiny_tied", "tiny_llama", "tiny_qwen3"],
    (2, 1): ["tiny_untied", "tiny_llama", "tiny_qwen3"],
    (1, 2): ["tiny_untied", "tiny_llama", "tiny_qwen3"],
    (2, 2): ["tiny_untied", "tiny_tied", "tiny_qwen3"],
}


def hf_logits(model_dir, tokens=TOKENS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp"), list(LAYOUTS))
def test_logits_match_transformers(tp, pp, request, tmp_path):
    models = LAYOUTS[tp, pp]
    srcs = [request.getfixturevalue(m) for m in models]
    ckpts = [hf_to_megatron(src, tmp_path / m, tp=tp, pp=pp) for m, src in zip(models, srcs, strict=True)]
    outs = [tmp_path / f"{m}.pt" for m in models]
    run_distributed("tests.models.workers:megatron_logits", tp * pp, ckpt=[str(c) for c in ckpts], tp=tp, pp=pp,
                    tokens=TOKENS, out=[str(o) for o in outs])
    for m, src, out in zip(models, srcs, outs, strict=True):
        got, want = torch.load(out, weights_only=True), hf_logits(src)
        assert got.shape == want.shape, m
        assert (got - want).abs().max().item() <= TOLERANCE, m


def test_the_llama_fixture_is_a_llama_whose_rope_scaling_the_parity_test_would_notice(tiny_llama, tmp_path):
    """Real ``LlamaForCausalLM`` with llama3 scaling; dropping the scaling moves logits beyond the original context
    by 100 times the parity tolerance (0.011 here), so a model that ignored it would fail the test above."""
    import json
    import shutil

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_llama).architectures == ["LlamaForCausalLM"]
    plain = tmp_path / "plain"
    shutil.copytree(tiny_llama, plain)
    cfg = json.loads((plain / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "llama3" and "attention_bias" in cfg and not cfg["attention_bias"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(cfg))
    moved = (hf_logits(plain) - hf_logits(tiny_llama)).abs().amax(dim=(0, 2))
    original = 64
    assert moved[original:].max().item() > 100 * TOLERANCE


@pytest.mark.distributed
def test_checkpoint_written_at_tp2_loads_at_tp1_pp2(tiny_untied, tmp_path):
    """A checkpoint laid out for TP2 (written by megatron-core's own saver at TP2) reshards on load."""
    converted = hf_to_megatron(tiny_untied, tmp_path / "tp2", tp=2, pp=1)
    saved = tmp_path / "saved_tp2"
    run_distributed("tests.models.workers:save_live_model", 2, ckpt_in=str(converted), ckpt_out=str(saved), tp=2, pp=1)
    (saved / "hf").symlink_to(converted / "hf")
    ckpts = {"converted": converted, "saved": saved}
    outs = {name: tmp_path / f"{name}.pt" for name in ckpts}
    run_distributed("tests.models.workers:megatron_logits", 2, ckpt=[str(c) for c in ckpts.values()], tp=1, pp=2,
                    tokens=TOKENS, out=[str(o) for o in outs.values()])
    logits = {name: torch.load(out, weights_only=True) for name, out in outs.items()}
    want = hf_logits(tiny_untied)
    assert (logits["converted"] - want).abs().max().item() <= TOLERANCE
    assert torch.equal(logits["converted"], logits["saved"])


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp"), [(2, 2)])
def test_sdpa_attention_equals_the_default_attention(tiny_untied, tp, pp, tmp_path):
    """The local spec with torch's scaled_dot_product_attention (GQA, causal) gives the default attention's logits."""
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt", tp=tp, pp=pp)
    attentions = ("default", "sdpa")
    outs = [tmp_path / f"{attention}.pt" for attention in attentions]
    run_distributed("tests.models.workers:megatron_logits", tp * pp, ckpt=str(ckpt), tp=tp, pp=pp, tokens=TOKENS,
                    out=[str(o) for o in outs], attention=list(attentions))
    logits = {a: torch.load(o, weights_only=True) for a, o in zip(attentions, outs, strict=True)}
    assert (logits["sdpa"] - logits["default"]).abs().max().item() <= 1e-5
    assert (logits["sdpa"] - hf_logits(tiny_untied)).abs().max().item() <= TOLERANCE

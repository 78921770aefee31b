"""Megatron GPTModel (real megatron-core on gloo) vs transformers on the same tokens and weights."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed

TOKENS = [[5, 17, 99, 3, 250, 999, 42, 7, 0, 12, 500, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 998]]
TOLERANCE = 1e-4


def hf_logits(model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("model", "tp", "pp"),
    [
        ("tiny_untied", 1, 1), ("tiny_untied", 2, 1), ("tiny_untied", 1, 2), ("tiny_untied", 2, 2),
        ("tiny_tied", 1, 1), ("tiny_tied", 2, 2), ("tiny_llama", 2, 1),
    ],
)
def test_logits_match_transformers(model, tp, pp, request, tmp_path):
    src = request.getfixturevalue(model)
    ckpt = hf_to_megatron(src, tmp_path / "ckpt", tp=tp, pp=pp)
    out = tmp_path / "logits.pt"
    run_distributed(
        "tests.models.workers:megatron_logits", tp * pp, ckpt=str(ckpt), tp=tp, pp=pp, tokens=TOKENS, out=str(out)
    )
    got, want = torch.load(out, weights_only=True), hf_logits(src)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOLERANCE


@pytest.mark.distributed
def test_checkpoint_written_at_tp2_loads_at_tp1_pp2(tiny_untied, tmp_path):
    """A checkpoint laid out for TP2 (written by megatron-core's own saver at TP2) reshards on load."""
    converted = hf_to_megatron(tiny_untied, tmp_path / "tp2", tp=2, pp=1)
    saved = tmp_path / "saved_tp2"
    run_distributed("tests.models.workers:save_live_model", 2, ckpt_in=str(converted), ckpt_out=str(saved), tp=2, pp=1)
    (saved / "hf").symlink_to(converted / "hf")
    logits = {}
    for name, ckpt in {"converted": converted, "saved": saved}.items():
        out = tmp_path / f"{name}.pt"
        run_distributed(
            "tests.models.workers:megatron_logits", 2, ckpt=str(ckpt), tp=1, pp=2, tokens=TOKENS, out=str(out)
        )
        logits[name] = torch.load(out, weights_only=True)
    want = hf_logits(tiny_untied)
    assert (logits["converted"] - want).abs().max().item() <= TOLERANCE
    assert torch.equal(logits["converted"], logits["saved"])


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp"), [(2, 2)])
def test_sdpa_attention_equals_the_default_attention(tiny_untied, tp, pp, tmp_path):
    """The local spec with torch's scaled_dot_product_attention (GQA, causal) gives the default attention's logits."""
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt", tp=tp, pp=pp)
    logits = {}
    for attention in ("default", "sdpa"):
        out = tmp_path / f"{attention}.pt"
        run_distributed("tests.models.workers:megatron_logits", tp * pp, ckpt=str(ckpt), tp=tp, pp=pp, tokens=TOKENS,
                        out=str(out), attention=attention)
        logits[attention] = torch.load(out, weights_only=True)
    assert (logits["sdpa"] - logits["default"]).abs().max().item() <= 1e-5
    assert (logits["sdpa"] - hf_logits(tiny_untied)).abs().max().item() <= TOLERANCE

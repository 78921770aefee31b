"""The FlowRL policy's Z head: exact prompt pooling of final-norm states, variants, checkpoints, lr."""

from __future__ import annotations

import pytest
import torch

from flowrl_megatron.config import ZHeadConfig
from flowrl_megatron.conversion.convert import hf_to_megatron
from flowrl_megatron.models.z_head import ZHead, mean_pool
from tests.distributed import run_distributed

TOKENS = [[5, 17, 99, 3, 250, 999, 42, 7, 0, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
PROMPT_LENGTHS = [4, 7]


def reference_log_z(model_dir, tokens, prompt_lengths, variant="paper") -> torch.Tensor:
    """transformers' final (post-norm) hidden states, mean over exactly the prompt tokens, through the same head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor(tokens), output_hidden_states=True).hidden_states[-1]  # [b, s, h]
        rows = [hidden[i, :n].mean(0) for i, n in enumerate(prompt_lengths)]
        head = ZHead(hidden.shape[-1], ZHeadConfig(variant=variant)).eval()
        return head(torch.stack(rows))


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp", "variant"), [(1, 1, "paper"), (2, 2, "paper"), (2, 1, "authors")])
def test_log_z_pools_exactly_the_prompt_on_the_last_stage(tiny_untied, tmp_path, tp, pp, variant):
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    out = tmp_path / "log_z.pt"
    run_distributed("tests.models.workers:policy_log_z", tp * pp, ckpt=str(ckpt), tp=tp, pp=pp, tokens=TOKENS,
                    prompt_lengths=PROMPT_LENGTHS, out=str(out), variant=variant)
    got = torch.load(out, weights_only=True)
    want = reference_log_z(tiny_untied, TOKENS, PROMPT_LENGTHS, variant)
    assert (got - want).abs().max().item() <= 1e-5
    # Off by one prompt token (the authors' code drops the last one) changes log Z: the test would see it.
    shorter = reference_log_z(tiny_untied, TOKENS, [n - 1 for n in PROMPT_LENGTHS], variant)
    assert (shorter - want).abs().min().item() > 1e-4


def test_mean_pool_uses_megatron_layout_and_ignores_the_response():
    hidden = torch.randn(6, 2, 4)  # [s, b, h]
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[:3, 0].mean(0)) and torch.allclose(pooled[1], hidden[:2, 1].mean(0))


def test_mean_pool_of_packed_rows_equals_padded_rows():
    """Two samples packed in one row pool exactly as when each has its own padded row."""
    torch.manual_seed(0)
    h = torch.randn(5, 3, 4)  # padded: sample 0 in row 0 (prompt 3 of 5), sample 1 in row 1 (prompt 2 of 4)
    padded_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    packed = torch.cat([h[:5, 0], h[:4, 1]]).unsqueeze(1)  # [9, 1, 4]
    packed_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    sample_ids = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1]])
    want = mean_pool(h, padded_mask)[:2]
    assert torch.allclose(mean_pool(packed, packed_mask, sample_ids), want, atol=1e-6)


def test_variants_and_detach_switch():
    paper = ZHead(8, ZHeadConfig())
    authors = ZHead(8, ZHeadConfig(variant="authors", dropout=0.1))
    assert [type(m).__name__ for m in paper.net] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [type(m).__name__ for m in authors.net] == [
        "Linear", "GELU", "LayerNorm", "Dropout", "Linear", "GELU", "LayerNorm", "Dropout", "Linear"]
    for cfg, reaches_llm in [(ZHeadConfig(), True), (ZHeadConfig(detach_input=True), False)]:
        pooled = torch.randn(3, 8, requires_grad=True)
        ZHead(8, cfg)(pooled).sum().backward()
        assert (pooled.grad is not None and pooled.grad.abs().sum() > 0) == reaches_llm


@pytest.mark.distributed
def test_z_head_is_saved_in_training_checkpoints_and_reshards(tiny_untied, tmp_path):
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    ranks = run_distributed("tests.models.workers:policy_checkpoint_round_trip", 2, ckpt=str(ckpt),
                            saved=str(tmp_path / "policy_tp2"))  # saved at TP2, loaded at TP1 x PP2
    fresh = [p.double().sum().item() for p in ZHead(128, ZHeadConfig()).parameters()]
    assert ranks[0]["before"] != pytest.approx(fresh)  # it was perturbed before saving (at TP2: on both ranks)
    assert ranks[1]["after"] == pytest.approx(ranks[0]["before"], abs=1e-9)  # last PP stage of the reload
    assert ranks[0]["after"] is None  # only the last stage has a Z head

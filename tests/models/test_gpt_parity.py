"""Megatron GPTModel (real megatron-core on gloo) vs transformers on the same tokens and weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed

# 160 positions: 2.5 times the tiny Llama's original context (64), where its llama3 RoPE scaling matters.
TOKENS = torch.randint(0, 1000, (2, 160), generator=torch.Generator().manual_seed(0)).tolist()
TOLERANCE = 1e-4
# Which families each layout is checked on: every family at TP1, TP2 and PP2; TP2 x PP2 for the families with a
# layout of their own (tied embeddings, query/key norms).
LAYOUTS = {
    (1, 1): ["tiny_untied", "tiny_tied", "tiny_llama", "tiny_qwen3"],
    (2, 1): ["tiny_untied", "tiny_llama", "tiny_qwen3"],
    (1, 2): ["tiny_untied", "tiny_llama", "tiny_qwen3"],
    (2, 2): ["tiny_untied", "tiny_tied", "tiny_qwen3"],
}
# PPO's critic from the same checkpoints: tied embeddings (the critic unties them; at PP2 its last stage holds none)
# and untied, at TP1 and TP2 x PP2.
CRITIC_LAYOUTS = {(1, 1): ["tiny_tied"], (2, 2): ["tiny_untied", "tiny_tied"]}


@pytest.fixture(scope="module")
def outputs(request, tmp_path_factory) -> dict[tuple, torch.Tensor]:
    """Megatron's outputs by (checkpoint, tp, pp, variant): the logits of every family of LAYOUTS converted for its
    layout ("default"); the TP2 x PP2 tiny_untied's also with SDPA attention ("sdpa"); tiny_untied converted at TP2
    and written again at TP2 by megatron-core's own saver, both loaded at TP1 x PP2; the values of critics built
    from the CRITIC_LAYOUTS checkpoints ("value"). One launch per world size runs all of its checkpoints."""
    root = tmp_path_factory.mktemp("parity")
    runs: dict[tuple, dict] = {}
    for (tp, pp), models in LAYOUTS.items():
        for m in models:
            ckpt = hf_to_megatron(request.getfixturevalue(m), root / f"{m}_tp{tp}_pp{pp}", tp=tp, pp=pp)
            runs[m, tp, pp, "default"] = dict(tp=tp, pp=pp, ckpt=str(ckpt))
    runs["tiny_untied", 2, 2, "sdpa"] = {**runs["tiny_untied", 2, 2, "default"], "attention": "sdpa"}
    for (tp, pp), models in CRITIC_LAYOUTS.items():
        for m in models:
            runs[m, tp, pp, "value"] = {**runs[m, tp, pp, "default"], "value_head": True}
    converted = Path(runs["tiny_untied", 2, 1, "default"]["ckpt"])
    saved = root / "saved_tp2"
    run_distributed("tests.models.workers:save_live_model", 2, ckpt_in=str(converted), ckpt_out=str(saved), tp=2, pp=1)
    (saved / "hf").symlink_to(converted / "hf")
    runs["converted_tp2", 1, 2, "default"] = dict(tp=1, pp=2, ckpt=str(converted))
    runs["saved_tp2", 1, 2, "default"] = dict(tp=1, pp=2, ckpt=str(saved))
    for i, run in enumerate(runs.values()):
        run["out"] = str(root / f"output{i}.pt")
    for world in sorted({tp * pp for _, tp, pp, _ in runs}):
        launched = [run for (_, tp, pp, _), run in runs.items() if tp * pp == world]
        run_distributed("tests.models.workers:megatron_outputs", world, runs=launched, tokens=TOKENS)
    return {key: torch.load(run["out"], weights_only=True) for key, run in runs.items()}


def hf_logits(model_dir, tokens=TOKENS) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp"), list(LAYOUTS))
def test_logits_match_transformers(tp, pp, outputs, request):
    for m in LAYOUTS[tp, pp]:
        got, want = outputs[m, tp, pp, "default"], hf_logits(request.getfixturevalue(m))
        assert got.shape == want.shape, m
        assert (got - want).abs().max().item() <= TOLERANCE, m


@pytest.mark.distributed
@pytest.mark.parametrize(("tp", "pp"), list(CRITIC_LAYOUTS))
def test_critic_values_are_its_value_head_on_the_checkpoints_final_hidden_states(tp, pp, outputs, request):
    """PPO's critic built from a converted checkpoint holds the language model's trunk (tied embeddings untied) and
    its seeded value head: V at each position is that head on transformers' final-norm hidden states."""
    from transformers import AutoModelForCausalLM

    from flowrl_megatron.models.value import ValueHead

    for m in CRITIC_LAYOUTS[tp, pp]:
        hf = AutoModelForCausalLM.from_pretrained(str(request.getfixturevalue(m)), dtype=torch.float32)
        with torch.no_grad():
            want = ValueHead(hf.config.hidden_size, torch.float32)(hf.model(torch.tensor(TOKENS)).last_hidden_state)[0]
        got = outputs[m, tp, pp, "value"]
        assert got.shape == want.shape == (len(TOKENS), len(TOKENS[0])), m
        assert (got - want).abs().max().item() <= TOLERANCE and want.std() > 10 * TOLERANCE, m


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
def test_checkpoint_written_at_tp2_loads_at_tp1_pp2(outputs, tiny_untied):
    """A checkpoint laid out for TP2 (written by megatron-core's own saver at TP2) reshards on load."""
    converted, saved = outputs["converted_tp2", 1, 2, "default"], outputs["saved_tp2", 1, 2, "default"]
    assert (converted - hf_logits(tiny_untied)).abs().max().item() <= TOLERANCE
    assert torch.equal(converted, saved)


@pytest.mark.distributed
def test_sdpa_attention_equals_the_default_attention(outputs, tiny_untied):
    """The local spec with torch's scaled_dot_product_attention (GQA, causal) gives the default attention's logits
    (TP2 x PP2)."""
    sdpa, default = outputs["tiny_untied", 2, 2, "sdpa"], outputs["tiny_untied", 2, 2, "default"]
    assert (sdpa - default).abs().max().item() <= 1e-5
    assert (sdpa - hf_logits(tiny_untied)).abs().max().item() <= TOLERANCE

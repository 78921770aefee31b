"""The tiny-model helper builds each family's own transformers class and refuses what it does not understand."""

from __future__ import annotations

import json

import pytest

from flowrl_megatron.models.tiny import FAMILIES, make_tiny_model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_its_own_class(family, tmp_path):
    cfg = json.loads((make_tiny_model(tmp_path / family, family, num_hidden_layers=1) / "config.json").read_text())
    assert cfg["architectures"] == [f"{FAMILIES[family]}ForCausalLM"] and cfg["num_hidden_layers"] == 1


def test_fields_the_family_lacks_and_unknown_families_are_refused(tmp_path):
    with pytest.raises(TypeError, match="LlamaConfig has no field use_sliding_window"):
        make_tiny_model(tmp_path / "a", "llama", use_sliding_window=True)  # a Qwen2 field
    with pytest.raises(TypeError, match="Qwen2Config has no field colour"):
        make_tiny_model(tmp_path / "b", "qwen2", colour="red")
    with pytest.raises(ValueError, match="unknown family 'mistral'; choose from qwen2, qwen3, llama"):
        make_tiny_model(tmp_path / "c", "mistral")
    assert not (tmp_path / "a").exists()  # refused before anything is written

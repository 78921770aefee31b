"""The decoder architecture, read once from a Hugging Face ``config.json``.

``ModelArch`` is the single description used by the model builder, the checkpoint mapping
and (later) the memory planner, so they cannot disagree about shapes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flowrl_megatron.errors import UserError

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")

# Vocabulary rows are padded to a multiple of this, independent of TP, so that one
# distributed checkpoint can be loaded at any TP that divides it (any power of two <= 128).
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_embeddings: bool
    max_position_embeddings: int

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def check_layout(self, tp: int, pp: int) -> None:
        """Reject a TP/PP layout this model cannot be split into, saying what would work."""
        if tp < 1 or pp < 1:
            raise UserError(f"tp and pp must be >= 1, got tp={tp} pp={pp}.")
        if self.num_heads % tp:
            raise UserError(
                f"TP={tp} does not divide the {self.num_heads} attention heads; "
                f"choose a TP from {_divisors(self.num_heads)}."
            )
        if self.num_kv_heads % tp:
            raise UserError(
                f"TP={tp} does not divide the {self.num_kv_heads} key/value heads; "
                f"choose a TP from {_divisors(self.num_kv_heads)}."
            )
        if self.ffn_hidden_size % tp or self.padded_vocab_size % tp:
            raise UserError(
                f"TP={tp} does not divide the MLP width {self.ffn_hidden_size} or the padded "
                f"vocabulary {self.padded_vocab_size}; choose a power-of-two TP."
            )
        if self.num_layers % pp:
            raise UserError(
                f"PP={pp} does not divide the {self.num_layers} layers; choose a PP from {_divisors(self.num_layers)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise UserError(f"RoPE type {rope_type!r} is not supported yet; only the default RoPE is implemented.")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Translate a Hugging Face config dict; unsupported features fail with a clear sentence."""
    archs = cfg.get("architectures") or []
    name = (
        archs[0]
        if archs
        else {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(
            cfg.get("model_type", ""), str(cfg.get("model_type"))
        )
    )
    if name not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"activation {cfg['hidden_act']!r} is not supported; only SwiGLU (silu) is.")
    if cfg.get("use_sliding_window"):
        raise UserError("sliding-window attention is not supported; set use_sliding_window to false.")
    if name != "Qwen2ForCausalLM" and cfg.get("mlp_bias"):
        raise UserError("MLP biases are not supported; only QKV biases are.")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    if name == "Qwen2ForCausalLM":
        qkv_bias = True
    else:
        qkv_bias = bool(cfg.get("attention_bias", False))
        if qkv_bias:
            raise UserError("Llama attention_bias=true also adds an output-projection bias, which is not supported.")
    return ModelArch(
        architecture=name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(cfg),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )


def load_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} not found; point --input at a Hugging Face model directory.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file from the model source.") from e


def load_arch(model_dir: str | Path) -> ModelArch:
    return arch_from_hf_config(load_hf_config(model_dir))

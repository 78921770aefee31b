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


@dataclass(frozen=True)
class Family:
    """What a decoder family fixes about its attention, whatever its config says."""

    qkv_bias: bool
    qk_norm: bool  # per-head RMSNorm on queries and keys before RoPE


FAMILIES = {
    "Qwen2ForCausalLM": Family(qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": Family(qkv_bias=False, qk_norm=True),
    "LlamaForCausalLM": Family(qkv_bias=False, qk_norm=False),
    "MistralForCausalLM": Family(qkv_bias=False, qk_norm=False),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
               "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "llama3")

# Vocabulary rows are padded to a multiple of this, independent of TP, so that one
# distributed checkpoint can be loaded at any TP that divides it (any power of two <= 128).
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.x's frequency-dependent RoPE scaling (``rope_type: llama3``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, those shorter than
    ``original_max_position_embeddings / high_freq_factor`` are kept, and the ones between are interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


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
    qk_norm: bool = False
    rope_scaling: Llama3RopeScaling | None = None

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


def _rope(cfg: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """RoPE base and scaling from either transformers 5's ``rope_parameters`` or the older ``rope_theta`` and
    ``rope_scaling`` fields."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(f"RoPE type {rope_type!r} (rope_scaling.rope_type) is not supported; supported: "
                        f"{', '.join(ROPE_TYPES)}.")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if params.get(f) is None]
    if missing:
        raise UserError(f"llama3 RoPE scaling needs {', '.join(missing)} in rope_scaling; copy them from the "
                        "model's original config.json.")
    return theta, Llama3RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                                    float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def _refuse_unsupported(cfg: dict[str, Any], name: str) -> None:
    """One sentence for the first thing ``cfg`` asks for that the Megatron model does not implement."""
    experts = [k for k in ("num_experts", "num_local_experts", "n_routed_experts") if cfg.get(k)]
    if experts:
        raise UserError(f"{experts[0]}={cfg[experts[0]]} asks for a mixture-of-experts model, which is not "
                        "supported; only dense models are.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {cfg['hidden_act']!r} is not supported; only SwiGLU (silu) is.")
    # Qwen configs carry a sliding_window size that only use_sliding_window switches on; Mistral's applies if set.
    window = "use_sliding_window" if "Qwen" in name else "sliding_window"
    asks = {"layer_types": set(cfg.get("layer_types") or ["full_attention"]) != {"full_attention"},
            window: bool(cfg.get(window)) if "Qwen" in name else cfg.get(window) is not None}
    for field, asked in asks.items():
        if asked:
            raise UserError(f"{field} asks for sliding-window attention, which is not supported; only full "
                            "attention in every layer is.")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("partial_rotary_factor below 1 is not supported; RoPE must rotate the whole head.")
    if cfg.get("mlp_bias"):
        raise UserError("mlp_bias=true is not supported; only bias-free MLPs are.")
    if name != "Qwen2ForCausalLM" and cfg.get("attention_bias"):
        raise UserError("attention_bias=true (biases on q, k, v and the output projection) is not supported for "
                        f"{name}; only Qwen2's QKV biases are.")
    asks_qk_norm = [k for k in ("use_qk_norm", "qk_layernorm", "qk_norm") if cfg.get(k)]
    if asks_qk_norm and not FAMILIES[name].qk_norm:
        raise UserError(f"{asks_qk_norm[0]}=true asks for query/key norms, which {name} does not have; only "
                        "Qwen3ForCausalLM has them.")


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """Translate a Hugging Face config dict; anything unsupported fails here, before any work, in one sentence."""
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else MODEL_TYPES.get(cfg.get("model_type", ""), str(cfg.get("model_type")))
    if name not in FAMILIES:
        raise UserError(f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}.")
    _refuse_unsupported(cfg, name)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
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
        rope_theta=theta,
        qkv_bias=FAMILIES[name].qkv_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qk_norm=FAMILIES[name].qk_norm,
        rope_scaling=scaling,
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

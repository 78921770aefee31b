"""Tiny random Hugging Face models made locally (no downloads), for tests, demos and benchmarks."""

from __future__ import annotations

import string
from pathlib import Path

import torch

# Heads of 32 are the smallest size vLLM's CPU attention accepts; 2 KV heads allow TP=2 with GQA.
TINY_QWEN2 = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=1000,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
)
# Llama 3.x: no biases, llama3 RoPE scaling over an original context of 64 tokens, so that sequences of a few
# hundred tokens reach the positions where the scaling matters.
TINY_LLAMA = {
    **{k: v for k, v in TINY_QWEN2.items() if k != "rope_theta"},
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
# Qwen3: heads of 64, so that heads x head_dim (256) differs from the hidden size, as in Qwen3-0.6B.
TINY_QWEN3 = {**TINY_QWEN2, "head_dim": 64}
FAMILIES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}  # family -> transformers' class prefix
TINY = {"qwen2": TINY_QWEN2, "qwen3": TINY_QWEN3, "llama": TINY_LLAMA}


def make_tokenizer(out_dir: Path) -> None:
    """A small word-level tokenizer with chat special tokens, saved in transformers' format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [*string.ascii_letters, *string.digits, *string.punctuation, "Answer", "answer", "the", " "]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(str(out_dir))


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    tie_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> Path:
    """Save a randomly initialised model of ``family``'s own transformers class (plus tokenizer) to ``out_dir``.

    ``overrides`` must be fields of that family's config: transformers keeps unknown keywords silently, so a
    misspelt or foreign field would otherwise build a different model than the caller asked for.
    """
    import transformers
    from transformers import GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}.")
    config_cls = getattr(transformers, f"{FAMILIES[family]}Config")
    model_cls = getattr(transformers, f"{FAMILIES[family]}ForCausalLM")
    # head_dim is read by Qwen2's attention though its config does not declare it
    unknown = sorted(set(overrides) - set(config_cls().to_dict()) - set(TINY[family]))
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field {', '.join(unknown)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_cls(**{**TINY[family], **overrides}, tie_word_embeddings=tie_embeddings, bos_token_id=0,
                     eos_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype)
    with torch.no_grad():
        # Random init leaves biases and norms at 0/1; perturb them so the mapping is fully tested.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, do_sample=True, temperature=1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    make_tokenizer(out)
    return out

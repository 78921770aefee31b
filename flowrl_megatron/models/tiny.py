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


def make_tiny_qwen2(
    out_dir: str | Path,
    *,
    tie_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> Path:
    """Save a randomly initialised ``Qwen2ForCausalLM`` (plus tokenizer) to ``out_dir``."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**{**TINY_QWEN2, **overrides}, tie_word_embeddings=tie_embeddings, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        # Random init leaves biases and norms at 0/1; perturb them so the mapping is fully tested.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, do_sample=True, temperature=1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    make_tokenizer(out)
    return out

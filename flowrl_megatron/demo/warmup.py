"""The demo's reference policy: a random tiny Qwen2, fine-tuned on answers sampled unevenly from each prompt's
valid set plus some invalid ones, so that it is diverse (several valid answers, unequal mass) but imperfect.

A prompt's answer field lists its valid letters most likely first; the warm-up samples answer i of m with weight
proportional to 1/(i+1) (mass ``1 - wrong_mass`` in all) and each invalid letter with an equal share of
``wrong_mass``. This runs in plain PyTorch on the Hugging Face model: it stands in for the pretrained checkpoint a
user would download, and the trainer then starts from it exactly as from any Hugging Face model.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import torch


def answer_weights(answer: str, wrong_mass: float) -> dict[str, float]:
    """The warm-up's distribution over the 26 one-letter answers of one prompt."""
    valid = answer.split("|")
    zipf = [1.0 / (i + 1) for i in range(len(valid))]
    weights = {a: (1 - wrong_mass) * z / sum(zipf) for a, z in zip(valid, zipf, strict=True)}
    wrong = [c for c in string.ascii_lowercase if c not in weights]
    return {**weights, **{c: wrong_mass / len(wrong) for c in wrong}}


def warm_up(model_dir: Path, rows: list[dict[str, str]], *, wrong_mass: float = 0.3, samples_per_prompt: int = 64,
            steps: int = 600, batch_size: int = 256, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Supervised fine-tuning of ``model_dir`` in place on sampled (prompt, answer) pairs; returns the loss curve ends.

    The loss covers the answer letter and the end-of-sequence token after it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    sequences = []
    for row in rows:
        weights = answer_weights(row["answer"], wrong_mass)
        for letter in rng.choices(list(weights), list(weights.values()), k=samples_per_prompt):
            sequences.append(tokenizer(row["prompt"] + letter)["input_ids"] + [tokenizer.eos_token_id])
    if len({len(s) for s in sequences}) != 1:
        raise ValueError("the warm-up expects prompts of one token length")
    data = torch.tensor(sequences)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(len(data), (batch_size,))]
        logits = model(input_ids=batch).logits[:, -3:-1]  # predicts the answer letter, then the end of sequence
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, -2:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / 20}

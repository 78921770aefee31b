"""n samples per prompt from the engines, graded: what the trainer's periodic evaluation and ``flowrl eval`` share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class GradedSamples:
    groups: list  # per prompt, its rollout.client.Sample list
    texts: list[list[str]]
    correct: list[list[bool]]
    answers: list[list[str]]  # final answers as the reward reads them ("" when none)
    scores: object  # rewards.pool.Scores, flat over prompts x samples


def sample_and_grade(client, tokenizer, pool, reward: str, prompts: Sequence[Sequence[int]], gold: Sequence[str],
                     sampling, seeds: Sequence[int], salt: str | None = None) -> GradedSamples:
    """``sampling.n`` samples of each prompt (token ids), decoded and graded against its gold answer; ``salt``: the
    prefix-cache salt of the engines' current weights (``rollout.producer.weight_salt``) when they change."""
    from flowrl_megatron.rewards import final_answer

    n = sampling.n
    groups = client.generate(prompts, sampling, seeds, salt=salt)
    texts = [[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in g] for g in groups]
    scores = pool.score([t for g in texts for t in g], [a for a in gold for _ in range(n)])
    correct = [[r > 0.5 for r in scores.rewards[i * n : (i + 1) * n]] for i in range(len(texts))]
    answers = [[final_answer(reward, t) for t in g] for g in texts]
    return GradedSamples(groups, texts, correct, answers, scores)

"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

import torch


def reference_logprobs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int, temperature: float):
    """Float64 full-softmax log-probs and entropy over the unpadded vocabulary."""
    z = logits[..., :vocab_size].double() / temperature
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def random_problem(seed: int = 0, shape=(3, 7), padded_vocab: int = 64, vocab_size: int = 57):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, padded_vocab, generator=g) * 3
    target = torch.randint(0, vocab_size, shape, generator=g)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return logits, target, g_lp, g_h


def compare_with_reference(tp: int = 1, chunk_tokens: int = 4, temperature: float = 0.7,
                           use_entropy: bool = True, vocab_size: int = 57) -> dict:
    """This rank's vocab slice through vocab_parallel_logprobs vs the float64 reference on the full vocab."""
    from flowrl_megatron.algorithms.logprobs import vocab_parallel_logprobs

    group, rank = None, 0
    if tp > 1:
        import torch.distributed as dist

        from flowrl_megatron.runtime import init_distributed

        init_distributed()
        group, rank = dist.group.WORLD, dist.get_rank()
    logits, target, g_lp, g_h = random_problem(vocab_size=vocab_size)
    width = logits.shape[-1] // tp
    local = logits[..., rank * width : (rank + 1) * width].clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs(local, target, vocab_start=rank * width, vocab_size=vocab_size,
                                    temperature=temperature, chunk_bytes=chunk_tokens * 4 * width, group=group)
    if not use_entropy:
        g_h = torch.zeros_like(g_h)
    (lp * g_lp + h * g_h).sum().backward() if use_entropy else (lp * g_lp).sum().backward()

    full = logits.double().requires_grad_(True)
    ref_lp, ref_h = reference_logprobs(full, target, vocab_size, temperature)
    (ref_lp * g_lp.double() + ref_h * g_h.double()).sum().backward()
    ref_grad = full.grad[..., rank * width : (rank + 1) * width]
    return {
        "logprob": (lp.double() - ref_lp).abs().max().item(),
        "entropy": (h.double() - ref_h).abs().max().item(),
        "grad": (local.grad.double() - ref_grad).abs().max().item(),
        "grad_scale": ref_grad.abs().max().item(),
        "padded_grad_zero": bool((local.grad[..., max(vocab_size - rank * width, 0):] == 0).all()),
        "valid_columns": max(0, min(width, vocab_size - rank * width)),
    }


def synthetic_batch(arch, batch_size: int = 8, seq_len: int = 14, group_size: int = 4, seed: int = 0):
    """Prompt + response rows with uneven lengths, right-padded; rewards in groups of ``group_size``."""
    from flowrl_megatron.algorithms.losses import normalize_rewards
    from flowrl_megatron.config import AlgorithmConfig
    from flowrl_megatron.training.batch import Batch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, arch.vocab_size, (batch_size, seq_len), generator=g)
    prompt_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    response_mask = torch.zeros_like(prompt_mask)
    for r in range(batch_size):
        p = 3 + r % 3
        n = 2 + (5 * r) % 7
        prompt_mask[r, :p] = True
        response_mask[r, p : p + n] = True
        tokens[r, p + n :] = 0
    rewards = torch.randint(0, 2, (batch_size,), generator=g).float()
    groups = torch.arange(batch_size) // group_size
    return Batch(
        tokens=tokens,
        prompt_mask=prompt_mask,
        response_mask=response_mask,
        old_logprobs=-torch.rand(batch_size, seq_len, generator=g) * 0.2 - 6.9,
        ref_logprobs=-torch.rand(batch_size, seq_len, generator=g) * 0.2 - 6.9,
        rewards=rewards,
        advantages=normalize_rewards(AlgorithmConfig(), rewards, groups),
        group_ids=groups,
    )


def policy_gradients(ckpt: str, layouts: list[list], out: str) -> None:
    """For each (tp, pp, variants) in turn, in the same processes (each layout replacing the previous one and
    reseeding), for each variant (``micro_batch_size``, ``max_tokens``, ``packed``, ``attention``, ``recompute``):
    loss stats and full gradients (HF names + Z head) of one global batch, FlowRL, GRPO and GSPO; on one rank also
    the per-token log-probs and each sample's log Z. One launch serves every layout of its world size."""
    from pathlib import Path

    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    arch = load_arch(Path(ckpt) / "hf")
    results = []
    for tp, pp, variants in layouts:
        init_model_parallel(ParallelLayout(tp=tp, pp=pp))
        results.append([_variant_gradients(ckpt, arch, **variant) for variant in variants])
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


def _variant_gradients(ckpt: str, arch, micro_batch_size: int, max_tokens: int, packed: bool, attention: str,
                       recompute: bool) -> dict:
    from megatron.core import parallel_state

    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.conversion.gather import gather_hf_state
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.training.micro_batches import MicroBatching, data_parallel_split
    from flowrl_megatron.training.parallel import wrap_ddp
    from flowrl_megatron.training.step import forward_backward, forward_logprobs

    model = build_gpt_model(arch, z_head=ZHeadConfig(), calculate_per_token_loss=True, recompute=recompute,
                            attention=attention)
    load_model_weights(model, ckpt, new_prefixes=("z_head.",))
    ddp = wrap_ddp(model)
    batching = MicroBatching(micro_batch_size, max_tokens, packed)
    batch = synthetic_batch(arch)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = torch.tensor(data_parallel_split(batch.lengths(), dp, batching)[dp_rank])
    local = batch.replace(rewards=None).select(mine)
    result = {}
    if torch.distributed.get_world_size() == 1:
        with torch.no_grad():
            result["logprobs"] = forward_logprobs([ddp], local, batching=batching, vocab_size=arch.vocab_size)
            result["log_z"] = log_z_per_sample(model, local, packed)
    for name in ("flowrl", "grpo", "gspo"):
        ddp.zero_grad_buffer()
        stats = forward_backward([ddp], local, AlgorithmConfig(name=name), batching=batching,
                                 vocab_size=arch.vocab_size, groups=2)
        grads = gather_hf_state(model, arch, tensor_of=lambda p: p.main_grad)
        result[name] = {"stats": stats, "grads": grads}
    result["ppo"] = _ppo_gradients(ckpt, arch, model, ddp, local, batch.rewards[mine], batching, recompute,
                                   attention)
    return result


def _ppo_gradients(ckpt: str, arch, model, ddp, local, rewards, batching, recompute: bool, attention: str) -> dict:
    """PPO on the same batch: the critic's values -> GAE (whitened over every DP rank's share) -> the policy's
    clipped surrogate and the critic's value loss; the statistics, the policy's and the critic's gradients."""
    import dataclasses

    from flowrl_megatron.config import AlgorithmConfig, CriticConfig, TrainConfig
    from flowrl_megatron.conversion.gather import gather_hf_state
    from flowrl_megatron.models.value import VALUE_HEAD_PREFIX
    from flowrl_megatron.training.critic import Critic
    from flowrl_megatron.training.step import forward_backward

    ppo = AlgorithmConfig(name="ppo")
    train = TrainConfig(recompute="full" if recompute else "none")
    critic = Critic.build(arch, CriticConfig(), train, torch.float32, attention, ckpt, total_updates=1)
    batch = local.replace()
    critic.set_advantages(batch, rewards, ppo, batching)
    ddp.zero_grad_buffer()
    stats = forward_backward([ddp], batch, ppo, batching=batching, vocab_size=arch.vocab_size)
    critic.zero_grad()
    stats.update(critic.forward_backward(batch, batching))
    grads = gather_hf_state(model, arch, tensor_of=lambda p: p.main_grad)
    # The critic's trunk through the mapping of a model without a vocabulary projection (tied: none of its own),
    # its value head as it is.
    trunk = dataclasses.replace(arch, tie_embeddings=True)
    critic_grads = gather_hf_state(critic.model, trunk, tensor_of=lambda p: p.main_grad,
                                   extra_prefixes=(VALUE_HEAD_PREFIX,))
    return {"stats": stats, "grads": grads, "critic_grads": critic_grads}


def log_z_per_sample(model, batch, packed: bool) -> torch.Tensor:
    """The policy's log Z of every row of ``batch``, all rows in one (packed or padded) micro-batch."""
    from flowrl_megatron.training.micro_batches import MicroBatching, micro_batches

    (micro,) = micro_batches(batch, MicroBatching(max_tokens=10**6, packed=packed))
    _, log_z = model(**micro.model_inputs(with_prompt_mask=True))
    return torch.zeros(len(micro.index)).index_copy(0, micro.index, log_z)

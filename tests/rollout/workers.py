"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def _probe(model_chunks, arch, client, prompts: list[list[int]]) -> float:
    """The trainer's probe (``Trainer._probe_engines``' parts): every engine's prompt log-probs against Megatron's;
    the worst engine's mean |difference|, on every rank."""
    from megatron.core import parallel_state

    from flowrl_megatron.rollout.mismatch import probe_mismatch, probe_stats
    from flowrl_megatron.training.batch import prompt_batch
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.step import forward_logprobs, reduce_stats

    box = [client.prompt_logprobs(prompts) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    batch = prompt_batch(prompts)
    train = forward_logprobs(model_chunks, batch, batching=MicroBatching(len(prompts)), vocab_size=arch.vocab_size)
    per_mb = []
    if parallel_state.is_pipeline_last_stage():
        mask = batch.prompt_mask.clone()
        mask[:, 0] = False
        per_mb = [probe_stats(train, box[0], mask)]
    return probe_mismatch(reduce_stats(per_mb), len(box[0]))[1].mean_abs_diff


def _sample_and_score(model_chunks, arch, client, prompts: list[list[int]]) -> dict:
    """Engines sample (rank 0); every rank scores the samples with Megatron; the last stage compares. The probe
    compares every engine's prompt log-probs too."""
    from megatron.core import parallel_state

    from flowrl_megatron.rollout.client import SamplingConfig
    from flowrl_megatron.rollout.mismatch import logprob_mismatch
    from flowrl_megatron.training.batch import Batch
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.step import forward_logprobs

    box = [None]
    if dist.get_rank() == 0:
        groups = client.generate(prompts, SamplingConfig(n=2, max_tokens=8), seeds=list(range(len(prompts))))
        box = [[(p, s.token_ids, s.logprobs, s.engine) for p, g in zip(prompts, groups, strict=True) for s in g]]
    dist.broadcast_object_list(box, src=0)
    samples = box[0]
    width = max(len(p) + len(t) for p, t, _, _ in samples)
    tokens = torch.zeros(len(samples), width, dtype=torch.long)
    rollout = torch.zeros(len(samples), width)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    prompt_mask = torch.zeros_like(mask)
    for i, (p, t, lps, _) in enumerate(samples):
        tokens[i, : len(p) + len(t)] = torch.tensor(p + t)
        rollout[i, len(p) : len(p) + len(t)] = torch.tensor(lps)
        mask[i, len(p) : len(p) + len(t)] = True
        prompt_mask[i, : len(p)] = True
    train = forward_logprobs(model_chunks, Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=mask),
                             batching=MicroBatching(len(samples)), vocab_size=arch.vocab_size)
    probe = _probe(model_chunks, arch, client, prompts)
    if not parallel_state.is_pipeline_last_stage():
        return {}
    engines = sorted({e for *_, e in samples})
    return {"probe": probe, **{f"engine{e}": logprob_mismatch(train[idx], rollout[idx], mask[idx]).max_abs_diff
                               for e in engines for idx in [torch.tensor([i for i, s in enumerate(samples)
                                                                          if s[3] == e])]}}


def sync_each_to_engines(runs: list[dict], tp: int, pp: int, api_key: str, steps: int) -> list[dict]:
    """``sync_to_engines`` for each run (``ckpt``, ``urls``, ``engine_tp``: one model and its engines) in turn, in
    the same processes."""
    return [sync_to_engines(tp=tp, pp=pp, api_key=api_key, steps=steps, **run) for run in runs]


def sync_to_engines(ckpt: str, tp: int, pp: int, urls: list[str], engine_tp: list[int], api_key: str,
                    steps: int) -> dict:
    """Load ``ckpt`` at TP x PP, take ``steps`` optimizer steps, compare log-probs with every engine's, sync them
    all, compare again. Launches that share engines take different numbers of steps, so each finds the engines
    serving other weights than its own."""
    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.rollout.client import RolloutClient
    from flowrl_megatron.rollout.weight_sync import EnginesClient, MegatronWeightSource, WeightSync
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.parallel import build_optimizer, wrap_ddp
    from flowrl_megatron.training.step import forward_backward
    from tests.algorithms.workers import synthetic_batch

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    arch = load_arch(Path(ckpt) / "hf")
    model = build_gpt_model(arch, z_head=ZHeadConfig(), calculate_per_token_loss=True)
    load_model_weights(model, ckpt, new_prefixes=("z_head.",))
    ddp = wrap_ddp(model)
    client = RolloutClient(urls, api_key)
    prompts = [[5, 17, 99], [1, 2, 3, 4], [400, 7], [31, 32, 33]]
    optimizer = build_optimizer([ddp], lr=1e-2, clip_grad=0.0)
    batch = synthetic_batch(arch).replace(rewards=None)
    for _ in range(steps):
        ddp.zero_grad_buffer()
        forward_backward([ddp], batch, AlgorithmConfig(), batching=MicroBatching(8), vocab_size=arch.vocab_size)
        optimizer.step()
    result = {"before_sync": _sample_and_score([ddp], arch, client, prompts)}
    engines = EnginesClient(urls, engine_tp, api_key) if dist.get_rank() == 0 else None
    sync = WeightSync(MegatronWeightSource(model, arch), engines, backend="gloo",
                      bucket_bytes=512 * 1024).connect()
    version = sync.send()  # streamed from every stage, bucket by bucket
    sync.close()
    if dist.get_rank() == 0:
        result["version"] = version
    dist.barrier()
    result["after_sync"] = _sample_and_score([ddp], arch, client, prompts)
    return result

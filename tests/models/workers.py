"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

from pathlib import Path

import torch


def megatron_outputs(runs: list[dict], tokens: list[list[int]]) -> None:
    """Each run (``tp``, ``pp``, ``ckpt``, ``out``, optionally ``attention`` and ``value_head``) in turn, in the same
    processes: initialise its layout (replacing the previous one), load ``ckpt`` at TP x PP, run the pipeline
    schedule forward, save the full-vocab float32 logits of the last stage to ``out`` (``value_head``: PPO's critic
    built from ``ckpt``, its values [b, s]). One launch serves every run of a world size."""
    for run in runs:
        _save_output(tokens=tokens, **run)


def _save_output(tp: int, pp: int, ckpt: str, out: str, tokens: list[list[int]], attention: str = "default",
                 value_head: bool = False) -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model, causal_attention_mask
    from flowrl_megatron.models.value import VALUE_HEAD_PREFIX
    from flowrl_megatron.runtime import ParallelLayout, device, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    arch = load_arch(Path(ckpt) / "hf")
    model = build_gpt_model(arch, params_dtype=torch.float32, attention=attention, value_head=value_head)
    load_model_weights(model, ckpt, new_prefixes=(VALUE_HEAD_PREFIX,) if value_head else ())
    model.eval()
    batch = torch.tensor(tokens, device=device())
    b, s = batch.shape

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        positions = torch.arange(s, device=ids.device).expand(b, s)
        output = model(input_ids=ids, position_ids=positions, attention_mask=causal_attention_mask(s, ids.device))

        def collect(output_tensor):
            if value_head:  # replicated on every TP rank: nothing to gather
                return output_tensor.sum() * 0, {"output": output_tensor.float().cpu()}
            full = tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor)
            return output_tensor.sum() * 0, {"output": full[..., : arch.vocab_size].float().cpu()}

        return output, collect

    with torch.no_grad():
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(results[0]["output"], out)


def save_live_model(ckpt_in: str, ckpt_out: str, tp: int, pp: int) -> None:
    """Load a checkpoint at TP x PP and write it again with megatron-core's own saver."""
    from flowrl_megatron.checkpoint import load_model_weights, save_model_weights
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    model = build_gpt_model(load_arch(Path(ckpt_in) / "hf"))
    load_model_weights(model, ckpt_in)
    save_model_weights(model, ckpt_out)


def sharded_layouts(config_dirs: list[str], tp: int, pp: int) -> list[dict[str, list]]:
    """``sharded_layout`` of each model, in one launch."""
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    return [sharded_layout(d) for d in config_dirs]


def sharded_layout(config_dir: str) -> dict[str, list]:
    """The pieces this rank's model part declares as main replicas: key -> [[global shape, offsets, sizes]]."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model

    model = build_gpt_model(load_arch(config_dir))
    found: dict[str, list] = {}
    for v in model.sharded_state_dict().values():
        if isinstance(v, ShardedTensorFactory):
            v = v.build_fn(v.key, v.data, v.replica_id, None)
        for sh in v if isinstance(v, list) else [v]:
            main = all(r == 0 for r in sh.replica_id) if isinstance(sh.replica_id, tuple) else sh.replica_id == 0
            if isinstance(sh, ShardedObject):
                found.setdefault(sh.unique_key, []).append("object")
            elif isinstance(sh, ShardedTensor) and main:
                sizes = [1] * sh.prepend_axis_num + list(sh.local_shape)
                found.setdefault(sh.key, []).append([list(sh.global_shape), list(sh.global_offset), sizes])
    return found


def policy_log_z(ckpt: str, tp: int, pp: int, tokens: list[list[int]], prompt_lengths: list[int], out: str,
                 variant: str = "paper") -> None:
    """log Z of each row from the policy's forward on the last stage (its prompt = the first prompt_lengths tokens)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.config import ZHeadConfig
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model, causal_attention_mask
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    arch = load_arch(Path(ckpt) / "hf")
    model = build_gpt_model(arch, z_head=ZHeadConfig(variant=variant), calculate_per_token_loss=True)
    load_model_weights(model, ckpt, new_prefixes=("z_head.",))
    model.eval()
    ids = torch.tensor(tokens)
    b, s = ids.shape
    prompt_mask = torch.arange(s)[None, :] < torch.tensor(prompt_lengths)[:, None]

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(input_ids=batch, position_ids=torch.arange(s).expand(b, s),
                    attention_mask=causal_attention_mask(s), prompt_mask=prompt_mask)

        def collect(output):
            return output[1].sum() * 0, torch.tensor(1, dtype=torch.int), {"log_z": output[1].detach()}

        return out, collect

    with torch.no_grad():
        res = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([ids]), model=[model],
                                          num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(res[0]["log_z"], out)


def policy_checkpoint_round_trip(ckpt: str, saved: str) -> dict:
    """At TP2, perturb a policy's Z head and save it; then, in the same processes, at TP1 x PP2, load it. The Z
    head's checksum on this rank at each layout (None where the rank holds no Z head)."""
    import torch.distributed as dist

    from flowrl_megatron.checkpoint import load_model_weights, save_model_weights
    from flowrl_megatron.config import ZHeadConfig
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    def checksum(model) -> list[float] | None:
        return [p.double().sum().item() for p in model.z_head.parameters()] if model.z_head is not None else None

    arch = load_arch(Path(ckpt) / "hf")
    init_model_parallel(ParallelLayout(tp=2, pp=1))
    model = build_gpt_model(arch, z_head=ZHeadConfig())
    load_model_weights(model, ckpt, new_prefixes=("z_head.",))
    with torch.no_grad():
        for p in model.z_head.parameters():
            p.mul_(-2.0).add_(0.5)  # differs from the seeded initialisation
    save_model_weights(model, saved)
    before = checksum(model)
    init_model_parallel(ParallelLayout(tp=1, pp=2))
    model = build_gpt_model(arch, z_head=ZHeadConfig())
    load_model_weights(model, saved)
    return {"rank": dist.get_rank(), "before": before, "after": checksum(model)}

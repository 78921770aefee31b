"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

from pathlib import Path

import torch


def megatron_logits(ckpt: str, tp: int, pp: int, tokens: list[list[int]], out: str, dtype: str = "float32") -> None:
    """Load ``ckpt`` at TP x PP, run the pipeline schedule forward, save full-vocab logits from the last stage."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from flowrl_megatron.checkpoint import load_model_weights
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model, causal_attention_mask
    from flowrl_megatron.runtime import ParallelLayout, device, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    arch = load_arch(Path(ckpt) / "hf")
    model = build_gpt_model(arch, params_dtype=getattr(torch, dtype))
    load_model_weights(model, ckpt)
    model.eval()
    batch = torch.tensor(tokens, device=device())
    b, s = batch.shape

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        positions = torch.arange(s, device=ids.device).expand(b, s)
        output = model(input_ids=ids, position_ids=positions, attention_mask=causal_attention_mask(s, ids.device))

        def collect(output_tensor):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(output_tensor)
            return output_tensor.sum() * 0, {"logits": full[..., : arch.vocab_size].float().cpu()}

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
        torch.save(results[0]["logits"], out)


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


def sharded_layout(config_dir: str, tp: int, pp: int) -> dict[str, list]:
    """The pieces this rank's model part declares as main replicas: key -> [[global shape, offsets, sizes]]."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
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

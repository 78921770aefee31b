"""Checkpoints under faults (real megatron-core dist_checkpointing on gloo): a damaged latest checkpoint is named and
the previous complete one resumed; a save that fails on a full disk keeps nothing of itself, leaves the previous
checkpoint intact and loadable, and says which path failed and why."""

from __future__ import annotations

import pytest

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed


def save_damage_and_fill_the_disk(ckpt: str, root: str) -> dict:
    """Runs on one rank under torchrun."""
    import os
    import resource
    import signal
    from pathlib import Path

    from flowrl_megatron.checkpoint import (
        LATEST,
        CheckpointWriteError,
        checkpoint_problem,
        latest_checkpoint,
        load_training_state,
        save_training_state,
    )
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.parallel import build_optimizer, wrap_ddp

    init_model_parallel(ParallelLayout())
    model = build_gpt_model(load_arch(Path(ckpt) / "hf"), calculate_per_token_loss=True)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], lr=1e-3)
    ddp.zero_grad_buffer()
    sum((p.float() ** 2).sum() for p in model.parameters()).backward()  # one step, so Adam has moments to save
    ddp.finish_grad_sync()
    optimizer.step()
    root = Path(root)
    out: dict = {}
    for step in (1, 2):
        save_training_state(root, step, model, optimizer, {"step": step}, keep=3)
    second = root / "step_00000002"
    out["complete"] = checkpoint_problem(second)
    biggest = max((f for f in second.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    os.truncate(biggest, biggest.stat().st_size // 2)
    out["problem"] = checkpoint_problem(second)
    resumed = latest_checkpoint(root)
    out["resumed"] = resumed.name
    out["state"] = load_training_state(resumed, model, optimizer)

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG, as ENOSPC would
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        save_training_state(root, 3, model, optimizer, {"step": 3}, keep=3)
    except CheckpointWriteError as e:
        out["error"] = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    out["entries"] = sorted(p.name for p in root.iterdir())
    out["latest"] = (root / LATEST).read_text().strip()
    out["after_failed_save"] = load_training_state(latest_checkpoint(root), model, optimizer)

    first = root / "step_00000001"
    (first / "trainer_state.json").write_text("{}")  # another size than written
    try:
        latest_checkpoint(root)
    except CheckpointWriteError as e:
        out["none_complete"] = str(e)
    return out


@pytest.mark.distributed
def test_damaged_and_failed_checkpoints(tiny_untied, tmp_path):
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    root = tmp_path / "checkpoints"
    (r,) = run_distributed("tests.test_checkpoint:save_damage_and_fill_the_disk", 1, ckpt=str(ckpt), root=str(root))
    assert r["complete"] is None and "bytes where" in r["problem"]
    assert r["resumed"] == "step_00000001" and r["state"] == {"step": 1}  # fell back past the damaged one
    assert r["error"].startswith(f"could not write checkpoint {root / 'step_00000003'}: File too large; nothing of "
                                 f"it was kept and {root / 'step_00000001'} is intact."), r["error"]  # not step 2
    assert r["entries"] == ["latest", "step_00000001", "step_00000002"]  # no .partial left
    assert r["latest"] == "step_00000002" and r["after_failed_save"] == {"step": 1}
    assert r["none_complete"] == (f"no complete checkpoint in {root}: step_00000002 is damaged ("
                                  + r["problem"] + f"); restore it from a copy, or move {root} away to start over.")

"""Load and save a live (possibly TP/PP-sharded) Megatron model's weights, and whole training states.

Goes through megatron-core's ``dist_checkpointing``, so a checkpoint written at one layout
loads at any other. Callers must run under ``if __name__ == "__main__":``: the writer
starts processes with spawn.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from flowrl_megatron.conversion.hf_io import HF_SUBDIR, copy_side_files
from flowrl_megatron.files import write_text_atomic


def load_model_weights(model: torch.nn.Module, ckpt_dir: str | Path, new_prefixes: tuple[str, ...] = ()) -> None:
    """Load every tensor of ``model`` from ``ckpt_dir``, except those under ``new_prefixes``, which keep their
    initialisation (a FlowRL policy's ``z_head.`` when starting from a converted language model)."""
    sharded = {k: v for k, v in model.sharded_state_dict().items() if not k.startswith(new_prefixes)}
    state = dist_checkpointing.load(sharded_state_dict=sharded, checkpoint_dir=str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(new_prefixes) for k in missing):
        raise RuntimeError(f"{ckpt_dir} does not match the model: missing {missing}, unexpected {unexpected}")


def save_model_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict=model.sharded_state_dict(), checkpoint_dir=str(ckpt_dir))


LATEST = "latest"  # a file naming the newest complete checkpoint; it moves last


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_training_state(root: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                        keep: int, hf_side: str | Path | None = None) -> Path:
    """Policy (with Z head) and optimizer through dist_checkpointing, this rank's RNG states, and ``state``
    (JSON: step, data position, LR schedule, weight version...), plus the Hugging Face config and tokenizer files
    of ``hf_side`` in ``hf/`` (so megatron_to_hf needs nothing else), written to a temporary directory that is
    renamed when complete; then the ``latest`` pointer moves, then checkpoints beyond ``keep`` are removed.
    A crash at any point leaves the previous checkpoint and pointer intact. Every rank calls this."""
    import torch.distributed as dist

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        tmp.mkdir(parents=True)
    dist.barrier()
    sharded = model.sharded_state_dict()
    dist_checkpointing.save({"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded)}, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if hf_side is not None:
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(Path(hf_side), tmp / HF_SUBDIR)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer) -> dict:
    """Inverse of ``save_training_state`` (also at another TP/PP layout, except the RNG states); returns ``state``."""
    import torch.distributed as dist

    path = Path(path)
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load({"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded,
                                                                                                   is_loading=True)},
                                     str(path))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    rng = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())

"""Load and save the weights of a live (possibly TP/PP-sharded) Megatron model.

Goes through megatron-core's ``dist_checkpointing``, so a checkpoint written at one layout
loads at any other. Callers must run under ``if __name__ == "__main__":``: the writer
starts processes with spawn.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing


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

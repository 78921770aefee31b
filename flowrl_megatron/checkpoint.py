"""Load and save a live (possibly TP/PP-sharded) Megatron model's weights, and whole training states.

Goes through megatron-core's ``dist_checkpointing``, so a checkpoint written at one layout
loads at any other. Callers must run under ``if __name__ == "__main__":``: the writer
starts processes with spawn.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import sys
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from flowrl_megatron.conversion.hf_io import HF_SUBDIR, copy_side_files
from flowrl_megatron.files import write_text_atomic
from flowrl_megatron.processes import die_with_parent


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
MANIFEST = "manifest.json"  # every file of a checkpoint and its size, written last before the rename


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; nothing of it was kept and the previous one is intact."""


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (a file missing or of another size than the save wrote: a disk that
    failed after the save, a copy cut short), or None. Checkpoints from before manifests existed are taken as they
    are: a save that did not finish never reaches its final name."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        want = json.loads(manifest.read_text())
    except ValueError:
        return f"its {MANIFEST} is unreadable"
    have = _file_sizes(path)
    for name, size in want.items():
        if name not in have:
            return f"{name} is missing"
        if have[name] != size:
            return f"{name} has {have[name]} bytes where {size} were written"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if it is complete, else the newest older complete
    one, with a warning on stderr that names the damaged one and why. Falling back (instead of stopping) loses the
    steps since that checkpoint, but a preempted job that is requeued again and again can still resume, and
    ``checkpoint.keep`` (default 2) keeps one to fall back to. None when there is no checkpoint; an error naming
    what is damaged, and what to do, when none is complete."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    named = root / pointer.read_text().strip()
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and p.name < named.name), reverse=True)
    damaged = []
    for path in ([named] if named.is_dir() else []) + older:
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                print(f"warning: checkpoint {damaged[0][0]} is damaged ({damaged[0][1]}); resuming from {path} "
                      "instead.", file=sys.stderr, flush=True)
            return path
        damaged.append((path, problem))
    if damaged:
        raise CheckpointWriteError(f"no complete checkpoint in {root}: {damaged[0][0].name} is damaged "
                                   f"({damaged[0][1]}); restore it from a copy, or move {root} away to start over.")
    return None


def _file_sizes(path: Path) -> dict[str, int]:
    return {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != MANIFEST}


def _root_cause(error: BaseException) -> str:
    """The operating system's reason behind a failed write (``No space left on device``), which libraries wrap in
    messages of their own ("unexpected pos 704 vs 598", "CheckpointException ranks:dict_keys([0])")."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        if found := re.search(r"\[Errno \d+\] ([^\n'\"]+)", str(seen)):  # raised in a writer process, as text
            return found[1].strip()
        seen = seen.__cause__ or seen.__context__
    return str(error).splitlines()[0]


def start_checkpoint_writer() -> None:
    """megatron-core's checkpoint writer returns its results through a multiprocessing Manager that it starts on the
    first save and keeps for the life of the process (``filesystem_async._results_queue``); a trainer killed with
    SIGKILL would leave that server process running forever. Start it here instead, with the parent-death signal:
    a trainer calls this while its engines boot, and a save calls it in case nobody did."""
    global _writer_manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _writer_manager is not None or filesystem_async._results_queue is not None:
        return
    _writer_manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _writer_manager.start(initializer=die_with_parent)
    filesystem_async._results_queue = _writer_manager.Queue()


_writer_manager: SyncManager | None = None


CRITIC_PREFIX = "critic."  # the critic's tensors in a checkpoint, apart from the policy's (and from any export)


def _sharded_training_state(model: torch.nn.Module, optimizer, critic, is_loading: bool = False) -> dict:
    """What dist_checkpointing saves of a run: the policy and its optimizer, and PPO's critic (``critic``: anything
    with ``model`` and ``optimizer``) and its optimizer under ``critic.`` keys."""
    sharded = model.sharded_state_dict()
    out = {"model": sharded, "optimizer": optimizer.sharded_state_dict(sharded, is_loading=is_loading)}
    if critic is not None:
        values = critic.model.sharded_state_dict(prefix=CRITIC_PREFIX)
        out["critic_model"] = values
        out["critic_optimizer"] = critic.optimizer.sharded_state_dict(values, is_loading=is_loading)
    return out


def save_training_state(root: str | Path, step: int, model: torch.nn.Module, optimizer, state: dict,
                        keep: int, hf_side: str | Path | None = None, critic=None) -> Path:
    """Policy (with Z head) and optimizer (and PPO's ``critic`` with its own) through dist_checkpointing, this
    rank's RNG states, and ``state``
    (JSON: step, data position, LR schedule, weight version...), plus the Hugging Face config and tokenizer files
    of ``hf_side`` in ``hf/`` (so megatron_to_hf needs nothing else), written to a temporary directory that is
    renamed when complete; then the ``latest`` pointer moves, then checkpoints beyond ``keep`` are removed.
    A crash at any point leaves the previous checkpoint and pointer intact. Every rank calls this."""
    import torch.distributed as dist

    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.partial"
    rank = dist.get_rank()
    start_checkpoint_writer()
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(_sharded_training_state(model, optimizer, critic), str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            if hf_side is not None:
                (tmp / HF_SUBDIR).mkdir()
                copy_side_files(Path(hf_side), tmp / HF_SUBDIR)
        dist.barrier()
        if rank == 0:  # last: what a complete checkpoint holds, checked before it is resumed from
            (tmp / MANIFEST).write_text(json.dumps(_file_sizes(tmp), indent=0))
    except (Exception, CheckpointException) as e:  # the latter is not an Exception
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"{previous} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {_root_cause(e)}; nothing of it was kept "
                                   f"and {kept}. Free space under {root} (or lower checkpoint.keep) and resume.") from e
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def load_training_state(path: str | Path, model: torch.nn.Module, optimizer, critic=None) -> dict:
    """Inverse of ``save_training_state`` (also at another TP/PP layout, except the RNG states); returns ``state``."""
    import torch.distributed as dist

    path = Path(path)
    loaded = dist_checkpointing.load(_sharded_training_state(model, optimizer, critic, is_loading=True), str(path))
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    if critic is not None:
        critic.model.load_state_dict({k.removeprefix(CRITIC_PREFIX): v for k, v in loaded["critic_model"].items()})
        critic.optimizer.load_state_dict(loaded["critic_optimizer"])
    rng = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())

"""Process lifetime of a run: every process it starts ends with it, and one run at a time owns a run directory."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

from flowrl_megatron.errors import UserError
from flowrl_megatron.files import make_dir

LOCK_FILE = ".lock"
# Set by `flowrl train` for the processes it launches: the run directory whose lock the launcher already holds.
HELD_LOCK_ENV = "FLOWRL_RUN_DIR_LOCKED"


PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here: a forked child must not load libraries
_forker: int | None = None  # in a forked child: the pid of the process that forked it


def die_with_parent() -> None:
    """In a child, before exec (``preexec_fn``), or in a process on its own: SIGTERM it when its parent dies, even
    by kill -9 (Linux PR_SET_PDEATHSIG), so nothing it runs is orphaned."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def forked_children_die_with_this_process() -> None:
    """Every process this one forks from now on (megatron-core's checkpoint writers fork mid-save) is SIGKILLed
    when its forker dies. A forked child keeps its parent's signal handlers, so it gets SIGKILL, not SIGTERM; and
    one whose parent was killed mid-save would otherwise wait forever on a queue that nobody fills."""
    os.register_at_fork(before=_remember_forker, after_in_child=_die_with_forker)


def _remember_forker() -> None:
    global _forker
    _forker = os.getpid()


def _die_with_forker() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forker:  # the forker died before the signal was armed
        os._exit(1)


def hold_run_dir(run_dir: Path) -> int:
    """An exclusive lock on ``run_dir`` for the life of this process (the kernel drops it when the process ends,
    also by kill -9), so a second run on the same directory is refused instead of racing the first. The file
    descriptor, kept open on purpose."""
    make_dir(run_dir, "run_dir")
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"{run_dir} is in use by a running flowrl train (pid {holder}); wait for it to end or stop "
                        "it, or pass another run_dir=.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def hold_run_dir_unless_launcher_does(run_dir: Path) -> int | None:
    """For a trainer started by ``flowrl train``, which holds the lock already, nothing; for one started by a
    launcher directly (torchrun under Slurm), the lock."""
    if os.environ.get(HELD_LOCK_ENV) == str(run_dir.resolve()):
        return None
    return hold_run_dir(run_dir)


def run_to_the_end(cmd: list[str], env: dict[str, str], what: str, resume_hint: str) -> int:
    """Run ``cmd`` (a launcher such as torchrun) as a child that dies with this process; SIGTERM or SIGINT here is
    passed on to it as SIGTERM and its end is awaited, so no process of the run outlives this one. Returns its exit
    code, or 128 + the signal when one stopped it (after saying so, and how to resume, in one sentence)."""
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not received:
        return code
    name = signal.Signals(received[0]).name
    print(f"{what} stopped by {name}; every process of the run has ended. {resume_hint}", file=sys.stderr, flush=True)
    return 128 + received[0]

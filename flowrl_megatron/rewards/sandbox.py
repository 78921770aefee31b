"""Run a model-written Python program where it cannot harm the host, the trainer, or other programs.

Each run, in the child between fork and exec (the parent must be single-threaded: the reward pool's workers are):

- its own session and process group, and its own user id, unused by anything else (a fresh one per run, so
  RLIMIT_NPROC, which does not bind root, caps its processes and a final kill of that uid reaches every process
  it started, including those that left its group);
- its own network namespace (no interface but a down loopback: no network) and mount namespace, where /tmp,
  /var/tmp and /dev/shm are fresh small tmpfs mounts: its private working directory is /tmp/work, and nothing it
  writes outlives it; every other directory belongs to root and is read-only to it;
- limits on CPU seconds, address space, file size, open files and processes; no core files;
- an empty environment (nothing of the trainer's), the system Python in isolated mode;
- a wall-clock timeout and an output cap enforced by the parent, which then kills the whole uid.

Needs root (namespaces, a fresh uid); elsewhere ``run_program`` raises ``SandboxUnavailable``.
"""

from __future__ import annotations

import ctypes
import os
import random
import resource
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
UID_BASE, UID_SPAN = 200_000, 800_000  # never a real account on the machines we run on


class SandboxUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_mb: int = 512
    file_mb: int = 8  # per file, and each private tmpfs
    processes: int = 16
    open_files: int = 64
    output_bytes: int = 1 << 20  # stdout and stderr together
    python: str = "/usr/bin/python3"  # readable by any user (a virtualenv under /root is not)


@dataclass
class Result:
    returncode: int | None  # None: killed by the parent (timeout or output cap)
    stdout: str
    stderr: str
    timed_out: bool
    output_capped: bool
    uid: int  # the run's own user id (no process of it is alive once run_program returns)


def _libc():
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"sandbox: {what} failed: {os.strerror(ctypes.get_errno())}")


def _enter(code: str, uid: int, limits: Limits) -> None:
    """In the child, before exec: namespaces, private dirs, the program file, limits, then drop to ``uid``."""
    libc = _libc()
    os.setsid()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    for path in PRIVATE_DIRS:
        if os.path.isdir(path):
            opts = f"size={limits.file_mb}m,mode=1777".encode()
            _check(libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, opts), f"mounting {path}")
    os.mkdir("/tmp/work", 0o700)
    with open("/tmp/work/main.py", "w") as f:
        f.write(code)
    os.chown("/tmp/work", uid, uid)
    os.chown("/tmp/work/main.py", uid, uid)
    os.chdir("/tmp/work")
    mib = 1024 * 1024
    for what, value in ((resource.RLIMIT_CPU, limits.cpu_s), (resource.RLIMIT_AS, limits.memory_mb * mib),
                        (resource.RLIMIT_FSIZE, limits.file_mb * mib), (resource.RLIMIT_NPROC, limits.processes),
                        (resource.RLIMIT_NOFILE, limits.open_files), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, (value, value))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def processes_of(uid: int) -> list[int]:
    """Live processes of ``uid`` (a killed one stays a zombie until its new parent, init, reaps it)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE]


def _kill_uid(uid: int, grace_s: float = 10.0) -> None:
    """SIGKILL every process of ``uid`` (kill(-1) from a helper that becomes that uid; it is spared, then exits),
    until none is left: a process forked while the signal went round is caught by the next one."""
    deadline = time.monotonic() + grace_s
    while True:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(uid)
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        if not processes_of(uid) or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def run_program(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    if os.geteuid() != 0:
        raise SandboxUnavailable("the code sandbox needs root (namespaces and a fresh user id per program)")
    if not os.access(limits.python, os.X_OK):
        raise SandboxUnavailable(f"{limits.python} is not an executable Python for the sandbox")
    uid = UID_BASE + random.SystemRandom().randrange(UID_SPAN)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp/work", "TMPDIR": "/tmp/work", "LANG": "C.UTF-8"}
    proc = subprocess.Popen([limits.python, "-I", "main.py"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, close_fds=True,
                            preexec_fn=lambda: _enter(code, uid, limits))
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = capped = False
    pending = stdin.encode()
    reading = set(out)
    selector = selectors.DefaultSelector()
    try:
        for stream in out:
            selector.register(stream, selectors.EVENT_READ)
        if pending:  # fed as the program reads: one that never reads cannot block us
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        deadline = time.monotonic() + limits.wall_s
        while reading and not capped:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in selector.select(timeout=left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = b""
                    if not pending:
                        selector.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    reading.discard(key.fileobj)
                    continue
                out[key.fileobj] += chunk
                capped = sum(map(len, out.values())) > limits.output_bytes
    finally:
        selector.close()
        _kill_uid(uid)  # everything it started, wherever it went
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, *out):
            stream.close()
    killed = timed_out or capped
    return Result(None if killed else proc.returncode, out[proc.stdout].decode(errors="replace"),
                  out[proc.stderr].decode(errors="replace"), timed_out, capped, uid)

"""One run per run directory: the lock refuses a second holder with one sentence, and the kernel releases it when
its holder dies, even by SIGKILL, so a resume after a crash is never refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flowrl_megatron.errors import UserError
from flowrl_megatron.processes import HELD_LOCK_ENV, hold_run_dir, hold_run_dir_unless_launcher_does

HOLD = "import sys, time; from pathlib import Path; from flowrl_megatron.processes import hold_run_dir; " \
       "hold_run_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"


def test_a_held_run_dir_is_refused_and_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"is in use by a running flowrl train \(pid {holder.pid}\)"):
            hold_run_dir(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    fd = hold_run_dir(tmp_path)  # the kernel dropped the dead holder's lock
    os.close(fd)


def test_a_trainer_under_flowrl_train_leaves_the_lock_to_its_launcher(tmp_path, monkeypatch):
    fd = hold_run_dir(tmp_path)
    try:
        monkeypatch.setenv(HELD_LOCK_ENV, str(tmp_path.resolve()))
        assert hold_run_dir_unless_launcher_does(tmp_path) is None
        monkeypatch.setenv(HELD_LOCK_ENV, str(tmp_path.resolve() / "other"))
        with pytest.raises(UserError, match="is in use"):
            hold_run_dir_unless_launcher_does(tmp_path)
    finally:
        os.close(fd)


FORK = """
import multiprocessing, os, sys, time
from flowrl_megatron.processes import forked_children_die_with_this_process

def grandchild():
    time.sleep(600)

def child(queue):
    worker = multiprocessing.get_context("fork").Process(target=grandchild)
    worker.start()
    queue.put(worker.pid)
    time.sleep(600)

if sys.argv[1] == "armed":
    forked_children_die_with_this_process()
queue = multiprocessing.get_context("fork").SimpleQueue()
forked = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
forked.start()
print(forked.pid, queue.get(), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("armed", [True, False])
def test_what_a_rank_forks_dies_when_it_is_killed(armed):
    """A checkpoint writer that megatron-core forks mid-save, and what it forks in turn, ends when its forker is
    killed with SIGKILL (the unarmed process shows the test would see a survivor)."""
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", FORK, "armed" if armed else "unarmed"], stdout=subprocess.PIPE,
                              text=True)
    forked = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs(forked, timeout=10 if armed else 1)
    for p in alive:
        p.kill()
    assert {p.pid for p in alive} == (set() if armed else {p.pid for p in forked})

"""A real one-node Slurm cluster (Debian slurm-wlm + munge) in a temporary directory, for tests: its own munge
key and socket, its own ports, state and logs; stopped by pid when the test ends (PLATFORM.md).
cred_expire=10: a requeued job waits cred_expire seconds (default 120) before it may start again."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from flowrl_megatron.runtime.distributed import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        missing = [d for d in DAEMONS if shutil.which(d) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed: `make test` installs slurm-wlm and munge "
                               "(apt-get, as root).")
        r = self.root
        for sub in ("munge", "state", "spool", "log"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={r / 'munge/socket'}",
                        f"--pid-file={r / 'munge/munged.pid'}", f"--log-file={r / 'munge/munged.log'}",
                        f"--seed-file={r / 'munge/seed'}"], check=True)
        host = socket.gethostname()
        memory_mb = min(int(psutil.virtual_memory().total / 2**20) - 2048, 20000)
        self.conf.write_text(f"""ClusterName=flowrltest
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge/socket'},cred_expire=10
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log/slurmctld.log'}
SlurmdLogFile={r / 'log/slurmd.log'}
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env).stdout
            if state.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm node did not become idle; see {r / 'log'}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True)
        for pid_file in (self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge/munged.pid"):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
                psutil.Process(pid).wait(timeout=20)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
            except psutil.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)

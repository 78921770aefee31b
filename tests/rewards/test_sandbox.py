"""The code sandbox contains hostile programs: each ends within its limits, scores 0, and leaves no process, file or
signal behind. The bounded fork test (500 sleeping children) runs first; the real fork bomb only after it passed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from flowrl_megatron.rewards.code import code_reward
from flowrl_megatron.rewards.sandbox import Limits, processes_of, run_program

LIMITS = Limits(wall_s=2.0, cpu_s=1, memory_mb=256, processes=16)
SLACK_S = 12.0  # on top of the wall limit: killing every process of the run's uid, on a loaded 2-core machine


def contained(code: str, limits: Limits = LIMITS, stdin: str = ""):
    start = time.monotonic()
    result = run_program(code, stdin=stdin, limits=limits)
    assert time.monotonic() - start <= limits.wall_s + SLACK_S
    assert processes_of(result.uid) == []
    return result


def test_an_ordinary_program_runs_with_nothing_of_ours():
    os.environ["FLOWRL_TEST_SECRET"] = "do-not-leak"
    result = contained("import os, sys\nprint(input()[::-1])\nprint(sorted(os.environ), os.getcwd())\n"
                       "print(os.getuid() != 0, file=sys.stderr)", stdin="olleh\n")
    assert result.returncode == 0
    assert result.stdout.splitlines() == ["hello", "['HOME', 'LANG', 'PATH', 'TMPDIR'] /tmp/work"]
    assert result.stderr.strip() == "True"


def test_bounded_fork_is_contained():
    """500 sleeping children asked for: at most the process limit exist, and none survive the run."""
    code = ("import os, time\nstarted = 0\nfor _ in range(500):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(60)\n        os._exit(0)\n"
            "    started += 1\nprint(started, flush=True)\ntime.sleep(60)")
    result = contained(code)
    assert result.timed_out and int(result.stdout) == LIMITS.processes - 1


HOSTILE = {
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "infinite loop": "while True:\n    pass",
    "memory bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))",
    "huge output": "while True:\n    print('x' * 65536)",
    "write outside its directory": "open({path!r}, 'w').write('pwned')",
    "open a socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('ok')",
    "read the environment": "import os\nprint(os.environ.get('FLOWRL_TEST_SECRET', ''))",
    "kill its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
    "sleep past the timeout": "import time\ntime.sleep(3600)",
}


def test_hostile_programs_are_contained_and_score_zero(tmp_path):
    os.environ["FLOWRL_TEST_SECRET"] = "do-not-leak"
    outside = [tmp_path / "pwned", Path("/tmp") / f"flowrl-pwned-{os.getpid()}"]
    tried = contained_count = 0
    for name, template in HOSTILE.items():
        for target in outside if "{path" in template else [None]:
            code = template.format(path=str(target)) if target else template
            tried += 1
            result = contained(code)
            assert "do-not-leak" not in result.stdout, name
            assert len(result.stdout) + len(result.stderr) <= LIMITS.output_bytes + 65536, name
            assert target is None or not target.exists(), name
            assert code_reward(f"```python\n{code}\n```", '[{"input": "", "output": "ok"}]') == 0.0, name
            contained_count += 1
    assert psutil.Process().is_running()  # the parent (this test) survived
    print(f"hostile programs: {tried} tried, {contained_count} contained")
    assert tried == contained_count == len(HOSTILE) + 1


def test_without_root_the_sandbox_refuses(monkeypatch):
    from flowrl_megatron.rewards import sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(sandbox.SandboxUnavailable, match="needs root"):
        run_program("print(1)")

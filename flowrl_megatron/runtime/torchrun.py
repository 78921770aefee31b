"""torchrun without its failure report: ``python -m flowrl_megatron.runtime.torchrun`` takes torchrun's arguments.

When a rank fails, torchrun prints a traceback of itself and a summary box under the rank's own output, and a
traceback of itself when it is stopped by a signal. Our ranks say what went wrong themselves (a bad input is one
sentence and exit code 2, a crash its traceback), and `flowrl train` or Slurm say what stopped the run, so this
exits with the failed rank's code, or 128 + the signal, and adds nothing.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)
    except SignalException as e:  # stopped (SIGTERM, SIGINT): torchrun has stopped the ranks; whoever sent it says so
        sys.exit(128 + e.sigval)


if __name__ == "__main__":
    main()

"""User-facing errors: each carries one sentence naming the problem and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input or configuration; command-line entry points print it and exit non-zero."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point: a ``UserError`` becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)

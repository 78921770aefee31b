"""Files that are complete or absent: written under a temporary name in the same directory, then renamed."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """A crash leaves the previous ``path`` (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def make_dir(path: Path, setting: str) -> Path:
    """``path`` created if needed, or one sentence naming ``setting`` and why it cannot be (a parent that is a
    file, no permission, a read-only file system)."""
    from flowrl_megatron.errors import UserError

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".flowrl-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{setting} {path} cannot be used: {e.strerror} ({e.filename}); choose a writable "
                        "directory.") from None
    return path

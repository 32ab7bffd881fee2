"""Outputs that appear whole or not at all, so a crash never leaves a half-written file or directory."""

import os
import shutil
from pathlib import Path


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it, and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def replace_directory(complete: Path, target: Path) -> None:
    """Move the finished directory ``complete`` to ``target``, replacing an older ``target``.

    The old directory is first renamed aside, so at every moment ``target`` is either the
    old directory, absent (only between two renames), or the new one; never a mixture.
    """
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    complete.rename(target)
    shutil.rmtree(old, ignore_errors=True)

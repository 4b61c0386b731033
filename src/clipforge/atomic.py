"""Files and directories that appear whole or not at all.

A writer fills a hidden temporary sibling of the target, everything in it is flushed to disk, and one rename
makes it visible; an earlier target is set aside first and removed after, and put back if the rename fails.
A crash at any moment leaves the old target or the new one, never a mixture (plus, at worst, a hidden
leftover that the next write does not mind).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file at `tmp`; it then replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(target.parent)


def write_directory(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills the new directory `tmp`; it then takes `target`'s place, whether or not `target`
    exists (callers check first that what is there may be replaced)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        write(tmp)
        for path in tmp.rglob("*"):  # on disk before the rename makes the directory visible
            if path.is_file():
                fsync_path(path)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}") if target.exists() else None
    if old is not None:
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)

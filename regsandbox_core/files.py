"""Atomic file output: readers see the old file or the complete new one, never a partial write."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_output(path: Path, *, before_replace: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a temporary file (mode 0600) beside ``path`` that replaces ``path`` only if the block succeeds.

    The file is flushed and fsynced before the rename, and the folder after it, so the rename
    survives a crash. ``before_replace`` receives the temporary file, so a caller can set its
    final owner and mode before it appears at ``path``. On any error the temporary file is removed.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if before_replace is not None:
            before_replace(Path(temporary))
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that needs a file name (DuckDB COPY, openpyxl).

    When the block succeeds, the file written there is fsynced and replaces ``path``, and the folder
    is fsynced. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Flush a folder's entries so that a rename in it survives a crash."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as stream:
        stream.write(data)


def make_private_dirs(path: Path, top: Path) -> None:
    """Create ``path`` and its parents below ``top`` with mode 0700, leaving ``top`` itself as it is."""
    target = top
    for part in path.relative_to(top).parts:
        target = target / part
        target.mkdir(mode=0o700, exist_ok=True)
        os.chmod(target, 0o700)

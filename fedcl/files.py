"""Crash-safe file writes: every file fedcl produces goes through `atomic_write` (JSON, CSV and PNG figures too)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

#: errno values by which a file system says a folder cannot be fsynced (not a failed write).
_UNSYNCABLE = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file through `write(fileobj)` into a temporary sibling, fsync, rename over `path`, fsync the folder.

    Readers see either the old file or the complete new one, never a partial write; once this returns, the rename
    itself is on disk too, so a power loss cannot bring the old file back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename into it) to disk: POSIX makes a rename durable only with the folder synced.

    Platforms whose folders cannot be opened (Windows) and file systems that cannot sync a folder (EINVAL) are
    skipped, since there the rename is all one can do; a real I/O error is raised.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _UNSYNCABLE:
            raise
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Atomically write `data` as indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    return atomic_write(path, lambda f: f.write(text.encode() + b"\n"))


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], leading: tuple[str, ...] = ()) -> Path:
    """Atomically write dict rows as CSV: the `leading` columns first, then every other key in first-seen order."""
    fields = list(leading)
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Atomically write a matplotlib figure as PNG (120 dpi) and close it (pyplot is imported only here)."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)

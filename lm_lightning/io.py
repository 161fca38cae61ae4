"""The one atomic write: a file or folder appears whole at its path, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) beside ``target``, renamed over ``target`` when the block succeeds.

    The caller writes into the yielded path. On success it is flushed to disk and renamed into place in one
    ``os.replace`` (atomic within a filesystem), so a reader, or a crash at any moment, sees either the old
    ``target`` or all of the new one; on failure the temporary path is removed and ``target`` is untouched.
    A folder replaces only a missing or empty ``target``: when another process renamed its own copy into
    place first (a cache written concurrently), that copy is kept and this one dropped. Permissions follow
    the umask, as for any file the user creates (``mkstemp`` alone would give 0600).
    """
    target = Path(target)
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp"
    if directory:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if directory else 0o666) & ~_umask())
    done = False
    try:
        yield tmp
        if not directory:
            _fsync(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # A folder cannot replace a non-empty one: another writer finished first, keep its copy.
            if not (directory and target.is_dir() and any(target.iterdir())):
                raise
        _fsync(target.parent)  # the rename itself is durable once the folder's entry is on disk
        done = True
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if not done:
            remove_empty(made)


def remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty: those made for a write that failed."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

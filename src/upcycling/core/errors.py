"""The one base class of the errors the project raises for bad input, and the file-system faults
that the CLI reports the same way.

A config, a corpus, token files, a checkpoint, fits or a CLI argument that cannot work raises a
subclass of :class:`InputError` whose message names the problem and the fix. The CLI prints such
an error as one ``error: ...`` line and exits 2, with no traceback; any other exception is a bug
and keeps its traceback. A full disk, an exhausted quota and a read-only or forbidden directory
are not bugs either: :func:`storage_error` turns such an ``OSError`` into a :class:`StorageError`
naming the directory (and, where the writer knows it, the space the write needs).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path


class InputError(ValueError):
    """Bad input; the message names the problem and the fix."""


class StorageError(InputError):
    """A write the file system refused (full, over quota, read-only, not permitted)."""


FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# numpy's tofile reports a short write (a full disk) without an errno: "167207 requested and 141312 written".
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def short_write(exc: BaseException) -> bool:
    """Whether ``exc`` says a write fell short without an errno: numpy's ``tofile`` (an OSError)
    and torch's zip writer (``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected
    pos``, ``PytorchStreamWriter failed writing file``), which is what a full disk looks like there."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is None:
        return bool(_SHORT_WRITE.search(text))
    return isinstance(exc, RuntimeError) and (
        "unexpected pos" in text or "PytorchStreamWriter failed writing" in text or "file write failed" in text
    )


def size_text(count: float) -> str:
    """Bytes for people: 1.2 GB, 340 MB, 12 kB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{int(count)} bytes"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest existing parent."""
    place = Path(os.path.abspath(path))
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        return shutil.disk_usage(place).free
    except OSError:
        return None


def storage_error(
    exc: BaseException, directory: str | os.PathLike | None = None, needed: int | None = None, what: str | None = None
) -> StorageError | None:
    """The StorageError for a write refused by the file system, or None for any other error.

    ``directory``: where the write went (default: the directory of the exception's file name);
    ``needed``: about how many bytes ``what`` needs, stated beside the free space."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code not in FULL + NOT_WRITABLE and not short_write(exc):
        return None
    if directory is None:
        filename = getattr(exc, "filename", None)
        directory = (os.path.dirname(os.fsdecode(filename)) or ".") if filename else None
    if directory is not None:
        from upcycling.core.publish import published_path

        directory = published_path(directory)  # not the staging name of a write that was rolled back
    where = f"{directory}" if directory is not None else "the output directory"
    if code in NOT_WRITABLE:
        kind = "is on a read-only file system" if code == errno.EROFS else "is not writable by this user"
        return StorageError(
            f"{where} {kind} ({os.strerror(code)}): {what or 'nothing'} can be written there; make it writable "
            "(or set results_dir to a writable directory) and rerun"
        )
    free = free_bytes(directory) if directory is not None else None
    have = f"{size_text(free)} free" if free is not None else "free space unknown"
    need = f"; {what or 'the write'} needs about {size_text(needed)}" if needed else ""
    cause = "over the disk quota (EDQUOT)" if code == errno.EDQUOT else "out of space (the disk is full)"
    if code is None:  # a short write: full, unless a quota or an I/O error cut it
        cause = "out of space (a write fell short: the disk is full or a quota is exhausted)"
    return StorageError(
        f"the disk holding {where} is {cause}: {have}{need}. Nothing partial was kept; free space there "
        "(or set results_dir to a larger disk) and rerun"
    )

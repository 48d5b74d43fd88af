"""Atomic publication of files and directories: readers see the old version or the new, whole.

Every output of the pipeline is written under a temporary name next to its final one and renamed
into place. A file rename (``os.replace``) is atomic on POSIX file systems. A directory that
already exists cannot be replaced by ``rename(2)``; Linux's ``renameat2(RENAME_EXCHANGE)`` swaps
the two directories atomically (ext4, xfs, btrfs, tmpfs; Lustre and GPFS too), after which the old
one is deleted. Where the file system refuses the exchange (NFS, old kernels), the old directory
is moved aside first: a reader may then briefly find no directory, never a partial one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temporary_sibling(path: Path) -> Path:
    """A unique temporary name beside ``path``, created by the caller with the umask's mode (as
    any output of the user's, readable by their group where the umask allows)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


_TEMPORARY_PART = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")


def published_path(path: str | os.PathLike) -> Path:
    """``path`` with every temporary sibling in it named as what it becomes once published (what a
    message about a write under a staging directory should name)."""
    return Path(*(_TEMPORARY_PART.sub(r"\1", part) for part in Path(path).parts))


def sha256_file(path: str | os.PathLike, block: int = 1 << 24) -> str:
    """The hex sha256 of a file, read in blocks (the digest recorded for and checked against a
    published file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def publish_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "x") as stream:  # not mkstemp: its 0600 mode would become the file's
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def publish_json(path: str | os.PathLike, payload, indent: int | None = 1) -> Path:
    """JSON (strict: no NaN or infinity) written atomically."""
    return publish_text(path, json.dumps(payload, indent=indent, allow_nan=False) + "\n")


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # not glibc >= 2.28
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def publish_dir(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put the complete directory ``staged`` at ``final``, replacing what was there atomically."""
    staged, final = Path(staged), Path(final)
    if not final.exists():
        os.replace(staged, final)
        return final
    if _exchange(staged, final):
        shutil.rmtree(staged)  # now holds the old version
        return final
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    os.replace(final, aside)
    os.replace(staged, final)
    shutil.rmtree(aside, ignore_errors=True)
    return final


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``final`` to fill; published at ``final`` when the block ends
    without an exception, deleted when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = temporary_sibling(final)
    staged.mkdir()  # not mkdtemp: its 0700 mode would become the published directory's
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    publish_dir(staged, final)

"""One lock per results directory: two runs that write the same results never run at once.

Every ``snakemake`` run that executes jobs takes it (``onstart`` in workflow/rules/common.smk, in the
driver only: the job wrappers of a cluster run never run the hooks) and so does every ``upcycling``
command that writes results outside Snakemake. The jobs a driver runs inherit its lock: the driver
names the directory it holds in the environment (:data:`HELD_ENV`), which its jobs receive (the local
executor's subprocesses, and Slurm jobs: the plugin submits with ``--export=ALL``), so they never
wait for their own driver.

The lock is an ``flock`` on ``<results>/.upcycling.lock``, which also holds who took it (host, pid,
start time, command): the kernel drops it when its process ends however it ends (kill -9, a lost
login session), so a finished run never leaves a lock behind. Where the file system has no
``flock`` (some network file systems), the holder written in the file is the lock, and a holder
on this host whose process is gone is stale and taken over. ``upcycling unlock <results_dir>``
removes a lock whose process is gone (a holder on another host cannot be checked from here).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from upcycling.core.errors import InputError

LOCK_NAME = ".upcycling.lock"
HELD_ENV = "UPCYCLING_RESULTS_LOCK_HELD"  # the results directories (real paths, os.pathsep-separated) held above us
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class ResultsLocked(InputError):
    """Another run holds the results directory's lock."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str
    command: str

    def describe(self) -> str:
        return f"{self.command!r} (pid {self.pid} on {self.host}, started {self.started})"


def lock_path(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / LOCK_NAME


def _this(command: str) -> Holder:
    return Holder(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), command)


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None for an empty, unreadable or foreign one."""
    try:
        data = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _gone(holder: Holder) -> bool:
    """Whether the holder's process has certainly ended (only a process on this host can be checked)."""
    return holder.host == socket.gethostname() and not process_alive(holder.pid)


def locked_message(results_dir: Path, holder: Holder | None) -> str:
    who = holder.describe() if holder else "another process (it recorded no holder)"
    where = f"on {holder.host}: `ps -p {holder.pid}`" if holder else "with `fuser`"
    return (
        f"results directory {results_dir} is in use by {who}: two runs on one results directory delete "
        f"each other's outputs, so this one stops here (nothing was changed). Wait for that run to end; "
        f"if its process is gone (check {where}), run `upcycling unlock {results_dir}` "
        f"or delete {lock_path(results_dir)}"
    )


def _held_above() -> set[str]:
    return set(filter(None, os.environ.get(HELD_ENV, "").split(os.pathsep)))


def _key(results_dir: Path) -> str:
    return os.path.realpath(results_dir)


def inherited(results_dir: str | os.PathLike) -> bool:
    """Whether a process above this one (the snakemake driver) holds this directory's lock."""
    return _key(Path(results_dir)) in _held_above()


class ResultsLock:
    """The lock of one results directory, held from :meth:`acquire` to :meth:`release` (or the
    process's end). ``command``: what is recorded as the holder."""

    def __init__(self, results_dir: str | os.PathLike, command: str | None = None):
        self.results_dir = Path(results_dir)
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> ResultsLock:
        """Take the lock, or ResultsLocked naming its holder; the directory is made if missing."""
        if self.held:
            return self
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = lock_path(self.results_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResultsLocked(locked_message(self.results_dir, read_holder(path))) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            holder = read_holder(path)  # no flock here: the recorded holder is the lock
            if holder is not None and holder.pid != os.getpid() and not _gone(holder):
                os.close(fd)
                raise ResultsLocked(locked_message(self.results_dir, holder)) from None
        me = json.dumps(asdict(_this(self.command))).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder: the file stays (removing it would race a process opening it)
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> ResultsLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def results_locked(results_dir: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Hold the results directory's lock for the block, unless a process above holds it already
    (a job run by the snakemake driver); ResultsLocked when another run holds it."""
    if inherited(results_dir):
        yield
        return
    with ResultsLock(results_dir, command):
        yield


def mark_held(results_dir: str | os.PathLike) -> None:
    """Tell this process's children (the jobs) that it holds the directory's lock."""
    os.environ[HELD_ENV] = os.pathsep.join(sorted(_held_above() | {_key(Path(results_dir))}))


def unlock(results_dir: str | os.PathLike) -> str:
    """Remove a lock whose holder is gone; ResultsLocked while it is held by a live process. Returns
    what was done, for the command's output."""
    results_dir = Path(results_dir)
    path = lock_path(results_dir)
    if not path.exists():
        return f"{results_dir} is not locked"
    holder = read_holder(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            if holder is None or not _gone(holder):
                raise ResultsLocked(
                    f"the lock of {results_dir} is held by a running process: "
                    + (holder.describe() if holder else "(no holder recorded)")
                    + "; stop that run first (unlock removes only a lock whose process is gone)"
                ) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            if holder is not None and not _gone(holder):
                raise ResultsLocked(
                    f"{results_dir} is locked by {holder.describe()}, which is still running or runs on another "
                    f"host: stop it first, or, if you are sure it is gone, delete {path}"
                ) from None
        finally:
            os.close(fd)
    path.unlink(missing_ok=True)
    return f"removed the lock of {results_dir}" + (f" (held by {holder.describe()})" if holder else "")

"""A lock file so two operators cannot change the same fleet at once.

``flock`` on a file named after the inventory, in ``/run/lock`` (or ``$SRHT_READONLY_LOCK_DIR``):
the kernel releases it when the holder exits, even after ``kill -9``, so a crashed run never
blocks the next one. The holder writes who it is into the file, for the refusal message.
Operators on *different* machines are not serialised by it: run changing commands from one
place (docs/runbook.md).
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .errors import Refused

ENV_DIR = "SRHT_READONLY_LOCK_DIR"


def lock_path(inventory_path: str | os.PathLike[str]) -> Path:
    """Where the lock for ``inventory_path`` lives."""
    directory = os.environ.get(ENV_DIR) or ("/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir())
    digest = hashlib.sha1(str(Path(inventory_path).resolve()).encode()).hexdigest()[:12]
    return Path(directory) / f"srht-readonly-{digest}.lock"


class OperatorLock:
    """``with OperatorLock(path, "switchover --to konpaku"):`` or ``Refused`` naming the holder."""

    def __init__(self, path: str | os.PathLike[str], command: str) -> None:
        self.path = Path(path)
        self.command = command
        self._fd: int | None = None

    def __enter__(self) -> OperatorLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or ``Refused`` naming the holder.

        The directory may be world-writable (``/tmp``): the file is opened without following a
        symlink (``O_NOFOLLOW``) and must be a regular file of ours, so nobody can make root
        truncate and write another file through it.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise Refused(f"cannot open the operator lock {self.path}: {exc.strerror}"
                          + (" (it is a symlink: remove it)" if os.path.islink(self.path) else "")) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise Refused(f"the operator lock {self.path} is not a regular file of yours (owner uid {info.st_uid}); "
                          "remove it, or set $SRHT_READONLY_LOCK_DIR to a directory only you can write")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise Refused(
                f"another operator is running `{holder.get('command', '?')}` (pid {holder.get('pid', '?')}, user "
                f"{holder.get('user', '?')}, since {holder.get('since', '?')}); nothing was changed. Wait for it to "
                f"finish and check `srht-readonly status` before trying again (lock: {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "user": _user(), "command": self.command,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def _holder(fd: int) -> dict[str, object]:
        try:
            data = os.pread(fd, 4096, 0)
            holder = json.loads(data or b"{}")
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.geteuid())

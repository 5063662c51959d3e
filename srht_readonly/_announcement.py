"""Operator announcements of planned maintenance, and the file that carries them to every process.

An announcement is a small file (default path: ``$SRHT_READONLY_ANNOUNCE_FILE``) that every
service process on a host can see. It is either plain text (the whole file is the message, in
effect at once) or a JSON object::

    {"message": "Database maintenance: read-only from 10:00 UTC for about 30 minutes.",
     "starts": "2024-06-08T10:00:00+00:00", "ends": "2024-06-08T11:00:00+00:00"}

``starts`` and ``ends`` are optional ISO 8601 times (without a zone they are UTC). Before
``starts`` the announcement is only shown; from ``starts`` until ``ends`` (or until the file
is removed) the database counts as read-only. Write the file atomically (write a temporary file
beside it, then rename it), as :meth:`Announcement.write` does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime

logger = logging.getLogger("srht_readonly.monitor")


def _parse_time(value: object, field: str) -> datetime | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{field} must be an ISO 8601 string, not {value!r}")
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when


@dataclass(frozen=True)
class Announcement:
    """Planned maintenance announced by an operator: what to tell users, and when it applies."""

    message: str
    starts: datetime | None = None
    ends: datetime | None = None

    def in_effect(self, now: float) -> bool:
        """Whether the database counts as read-only at ``now`` (seconds since the epoch)."""
        if self.starts is not None and now < self.starts.timestamp():
            return False
        return not (self.ends is not None and now >= self.ends.timestamp())

    @classmethod
    def parse(cls, text: str) -> Announcement:
        """Read an announcement file's content: a JSON object, or plain text in effect now."""
        stripped = text.strip()
        if not stripped.startswith("{"):
            return cls(message=stripped)
        data = json.loads(stripped)
        message = data.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ValueError('the JSON object needs a non-empty "message"')
        return cls(
            message=message.strip(),
            starts=_parse_time(data.get("starts"), "starts"),
            ends=_parse_time(data.get("ends"), "ends"),
        )

    def to_json(self) -> str:
        """The JSON form :meth:`parse` reads back."""
        data: dict[str, str] = {"message": self.message}
        if self.starts is not None:
            data["starts"] = self.starts.isoformat()
        if self.ends is not None:
            data["ends"] = self.ends.isoformat()
        return json.dumps(data)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Publish this announcement at ``path`` atomically (every process sees all or nothing).

        The file and then its directory are flushed to disk, so a crash loses neither the
        announcement nor the rename that published it.
        """
        directory = os.path.dirname(os.fspath(path)) or "."
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".announce-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json() + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        try:
            _fsync_directory(directory)
        except OSError as exc:  # published all the same: every process sees it
            logger.warning("announcement %s published, but flushing %s to disk failed: %s", path, directory, exc)


def _fsync_directory(path: str) -> None:
    # As srht_readonly.ops.remote.fsync_directory (the application side does not import ops).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # a file system that cannot
            raise
    finally:
        os.close(fd)


class AnnouncementFile:
    """Re-reads an announcement file only when its stat (mtime, size, inode) changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.current: Announcement | None = None
        self._key: tuple[int, int, int] | None = None
        self._broken_key: tuple[int, int, int] | None = None

    def refresh(self) -> bool:
        """Stat the file, re-read it if it changed; return whether ``current`` changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._set(None, None)
        except OSError as exc:
            logger.warning("cannot stat announcement file %s: %s", self.path, exc)
            return False
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if key == self._key or key == self._broken_key:
            return False
        try:
            with open(self.path, encoding="utf-8") as handle:
                text = handle.read()
            announcement = Announcement.parse(text) if text.strip() else None
        except (OSError, ValueError) as exc:
            # Logged once per version of the file; the previous announcement stays in force.
            self._broken_key = key
            logger.warning("ignoring announcement file %s: %s; fix it or remove it", self.path, exc)
            return False
        return self._set(key, announcement)

    def _set(self, key: tuple[int, int, int] | None, announcement: Announcement | None) -> bool:
        self._key = key
        changed = announcement != self.current
        self.current = announcement
        return changed

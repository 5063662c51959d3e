"""Stand-ins for the tests of pure logic (no server): driver errors, clocks, probes, sessions.

Real servers are used wherever code talks to one; these are for what can be decided without
one (the SQLSTATE table, backoff timing, the monitor's state machine, Flask's request flow).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from srht_readonly import ReadOnlyMonitor


class Pg2Error(Exception):
    """Stands in for a psycopg2 error (``pgcode``), as SQLAlchemy's ``.orig``."""

    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


def read_only_error() -> Pg2Error:
    return Pg2Error("cannot execute INSERT in a read-only transaction", "25006")


def lost_connection_error() -> Pg2Error:
    return Pg2Error("server closed the connection unexpectedly")


def dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Dispose every engine a test made, even when it fails: a connection left to the garbage
    collector is a ResourceWarning, and warnings are errors. Use from an autouse fixture."""
    made: list[sa.Engine] = []
    real = sa.create_engine

    def create_engine(*args: Any, **kwargs: Any) -> sa.Engine:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sa, "create_engine", create_engine)
    yield
    for engine in made:
        engine.dispose()


class Clock:
    """Monotonic and wall clocks that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.wall += seconds


class Probe:
    """A monitor probe whose answer the test sets; records when it was asked."""

    def __init__(self, clock: Clock, answer: bool | Exception = False) -> None:
        self.clock = clock
        self.answer = answer
        self.calls: list[float] = []

    def __call__(self) -> bool:
        self.calls.append(self.clock.now)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def monitor_on(clock: Clock, probe: Any = None, **options: Any) -> ReadOnlyMonitor:
    """A monitor on ``clock`` (no announcement file unless given)."""
    options.setdefault("announce_file", None)
    return ReadOnlyMonitor(probe=probe, clock=clock, wall_clock=lambda: clock.wall, **options)


class FakeTime:
    """A clock for Deadline and a sleep that advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingSession:
    """A session that records rollback/flush/commit and fails the next commits with ``commit_errors``."""

    def __init__(self, commit_errors: list[Exception] | None = None) -> None:
        self.log: list[str] = []
        self.commit_errors = commit_errors or []

    def rollback(self) -> None:
        self.log.append("rollback")

    def flush(self) -> None:
        self.log.append("flush")

    def commit(self) -> None:
        self.log.append("commit")
        if self.commit_errors:
            raise self.commit_errors.pop(0)


class UnboundSession:
    """A Flask-side session: counts rollbacks; unbound, so the monitor has no engine to probe."""

    def __init__(self) -> None:
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1

    def get_bind(self) -> None:
        return None


class FsyncRecorder:
    """Wraps the real ``os.fsync`` (it still flushes) and records each call: ``"dir"`` or
    ``"file"``, the (st_dev, st_ino) of what was flushed, and what ``watch`` held at that moment
    (None while it did not exist), so a test can tell a directory flushed after a rename."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, watch: Path) -> None:
        self.calls: list[tuple[str, tuple[int, int], str | None]] = []
        real = os.fsync

        def fsync(fd: Any) -> None:
            st = os.fstat(fd)
            try:
                content: str | None = watch.read_text()
            except FileNotFoundError:
                content = None
            self.calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", (st.st_dev, st.st_ino), content))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def identity(path: Path) -> tuple[int, int]:
    """(st_dev, st_ino) of ``path``, to compare with ``FsyncRecorder.calls``."""
    st = path.stat()
    return st.st_dev, st.st_ino

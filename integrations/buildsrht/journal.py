"""The build's database updates, applied in order by one thread, each retried until writable.

The runner ``put``s an update and carries on with the build; a background thread applies the
updates one after the other through ``retry_until_writable`` with the build's one ``Deadline``.
While the database is read-only the head update waits (backoff with full jitter) and the rest
queue behind it, so they are applied in the order the build produced them, none skipped. The
runner calls ``wait()`` at the end of the build: it blocks until every update is recorded, or
raises the ``DeadlineExceeded`` that stopped the thread.

Every update must be **idempotent** (absolute values, event times computed by the runner, inserts
with ``ON CONFLICT DO NOTHING``): the journal passes ``idempotent=True``, so a COMMIT whose
outcome is unknown is simply applied again, and since the journal never moves past an update
before it is known to be committed, a repeated update can never overwrite a later one.

While the thread waits it logs once per state change (read-only, unreachable, writable again),
not once per try.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from srht_readonly import Deadline, Failure, retry_until_writable

__all__ = ["Update", "UpdateJournal"]

_STATE = {Failure.READ_ONLY: "read-only", Failure.UNAVAILABLE: "unreachable",
          Failure.COMMIT_UNKNOWN: "lost during COMMIT"}


@dataclass(frozen=True)
class Update:
    """One idempotent database update of a build, and how to name it in logs."""

    what: str
    statement: Executable


class UpdateJournal:
    """Applies ``put`` updates in order in a thread; ``wait()`` blocks until all are recorded.

    ``session_factory`` (default ``Session(engine)``) makes the session the thread uses;
    ``retry`` is passed to ``retry_until_writable`` (``factor``, ``max_wait``, ...).
    """

    def __init__(
        self,
        engine: Engine,
        deadline: Deadline,
        *,
        log: logging.Logger | logging.LoggerAdapter[Any],
        monitor: Any = None,
        session_factory: Callable[[], Session] | None = None,
        retry: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.deadline = deadline
        self.log = log
        self.monitor = monitor
        self.session_factory = session_factory or (lambda: Session(engine))
        self.retry = dict(retry or {})
        self.recorded: list[str] = []
        self.waited = 0.0  # seconds the updates spent waiting for the database, in all
        self.error: BaseException | None = None
        self._queue: deque[Update] = deque()
        self._closed = False
        self._cond = threading.Condition()
        self._state: Failure | None = None
        self._blocked_since = 0.0
        self._thread = threading.Thread(target=self._run, name="build-journal", daemon=True)
        self._thread.start()

    # -- the runner's side -----------------------------------------------------------------

    def put(self, what: str, statement: Executable) -> None:
        """Queue an update (idempotent!) to be applied after the ones already queued."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the journal is closed")
            self._queue.append(Update(what, statement))
            self._cond.notify_all()

    def pending(self) -> list[str]:
        """What is queued and not yet known to be recorded, in order."""
        with self._cond:
            return [u.what for u in self._queue]

    def wait(self) -> None:
        """Block until every queued update is recorded; re-raise what stopped the thread."""
        with self._cond:
            while self._queue and self.error is None:
                self._cond.wait(timeout=0.5)
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        """Stop the thread once it is idle (or at once if it failed); queued updates are dropped."""
        with self._cond:
            self._closed = True
            if self.error is not None:
                self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout=max(1.0, self.deadline.remaining() + 5))

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        session = self.session_factory()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closed:
                        self._cond.wait()
                    if not self._queue:
                        return
                    update = self._queue[0]
                try:
                    self._apply(session, update)
                except BaseException as exc:  # DeadlineExceeded, or a bug: the runner decides
                    with self._cond:
                        self.error = exc
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._queue.popleft()
                    self.recorded.append(update.what)
                    backlog = len(self._queue)
                    self._cond.notify_all()
                if self._state is not None:
                    blocked = time.monotonic() - self._blocked_since
                    self.waited += blocked
                    self.log.info("database writable again after %.1f s; recording %d held update(s)",
                                     blocked, backlog + 1)
                    self._state = None
        finally:
            session.close()

    def _apply(self, session: Session, update: Update) -> None:
        policy = retry_until_writable(
            self.deadline, session=session, idempotent=True, monitor=self.monitor, on_wait=self._on_wait,
            **self.retry,
        )
        for attempt in policy:
            with attempt:
                session.execute(update.statement)

    def _on_wait(self, event: Any) -> None:
        failure = event["failure"]
        if failure is self._state:
            return  # same state as the last try: nothing new to say
        if self._state is None:
            self._blocked_since = time.monotonic()
        self._state = failure
        self.log.warning(
            "database %s; the build goes on and its updates wait, in order (%d held, next: %s); "
            "%.1f s left before the build's deadline",
            _STATE.get(failure, failure.value), len(self.pending()), self._queue[0].what if self._queue else "-",
            event["remaining"],
        )

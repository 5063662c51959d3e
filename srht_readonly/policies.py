"""The plan's verbs for a write that meets a read-only database: abort, drop, retry (and fail).

Each is usable as a decorator and as a context manager:

* ``abort_on_read_only(message)``: the failure becomes ``ReadOnlyError(message)`` (or
  ``DatabaseUnavailable(message)`` if the database went away), for adapters to show the user.
* ``drop_on_read_only(session_or_conn, warn=None)``: the write runs inside a SAVEPOINT and is
  silently rolled back to it on a read-only failure, so the caller's transaction still reads;
  ``warn`` is written to stderr (flushed) once per process.
* ``retry_until_writable(deadline)``: retries with backoff until the write succeeds or the
  deadline passes (``DeadlineExceeded``). A ``with`` block cannot re-run its body, so the
  context-manager form is a loop of attempts::

      for attempt in retry_until_writable(60, session=session):
          with attempt:
              session.execute(update(Job).values(status="running"))

* *fail* (Celery) needs no verb here: ``srht_readonly.celery`` ends such tasks cleanly.

Exceptions raised by these policies keep the original database error as ``__cause__``.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, Literal, ParamSpec, TypeVar

from ._retry import Attempt, Deadline, Log, RetryEvent, RetryPolicy
from ._retry import logger as _retry_logger
from ._root import SrhtReadOnlyError
from .errors import DatabaseUnavailable, Failure, ReadOnlyError, classify

__all__ = [
    "AbortPolicy",
    "Attempt",
    "Deadline",
    "DropPolicy",
    "RetryEvent",
    "RetryPolicy",
    "abort_on_read_only",
    "drop_on_read_only",
    "retry_until_writable",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _observe(monitor: Any, exc: BaseException) -> Failure | None:
    return monitor.observe(exc) if monitor is not None else classify(exc)


class AbortPolicy:
    """What ``abort_on_read_only`` returns; stateless, so one instance may be shared freely."""

    def __init__(self, message: str, *, monitor: Any = None) -> None:
        self.message = message
        self.monitor = monitor

    def __enter__(self) -> AbortPolicy:
        if self.monitor is not None and self.monitor.read_only:
            # Refused before doing anything, so there is no database error to chain.
            if self.monitor.state.failure in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
                raise DatabaseUnavailable(self.message)
            raise ReadOnlyError(self.message)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if not isinstance(exc, Exception) or isinstance(exc, SrhtReadOnlyError):
            return False
        failure = _observe(self.monitor, exc)
        if failure is Failure.READ_ONLY:
            raise ReadOnlyError(self.message) from exc
        if failure is not None:
            raise DatabaseUnavailable(self.message, failure=failure) from exc
        return False

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with self:
                return fn(*args, **kwargs)

        return wrapper


def abort_on_read_only(message: str, *, monitor: Any = None) -> AbortPolicy:
    """Turn a read-only failure inside the block into ``ReadOnlyError(message)``.

    ``message`` is for the user ("git.sr.ht is in read-only maintenance; try again later").
    A lost connection becomes ``DatabaseUnavailable(message)``; other errors pass unchanged.
    With a ``monitor`` that already knows the database is read-only, the body does not run
    at all; failures are also fed to ``monitor.observe``.
    """
    return AbortPolicy(message, monitor=monitor)


class DropPolicy:
    """What ``drop_on_read_only`` returns. As a decorator, each call gets its own savepoint."""

    def __init__(
        self, target: Any, warn: str | None = None, *, monitor: Any = None, stream: IO[str] | None = None
    ) -> None:
        self.target = target
        self.warn = warn
        self.monitor = monitor
        self.stream = stream
        self.dropped = False
        self._savepoint: Any = None

    def __enter__(self) -> DropPolicy:
        if self._savepoint is not None:
            raise RuntimeError("this drop_on_read_only block is already in use; create one per block")
        self.dropped = False
        self._savepoint = self.target.begin_nested()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        savepoint, self._savepoint = self._savepoint, None
        if exc is None:
            try:
                savepoint.commit()  # RELEASE SAVEPOINT; a Session flushes its pending writes here
            except Exception as failed:
                if self._handle(savepoint, failed):
                    return False
                raise
            return False
        if not isinstance(exc, Exception):
            self._rollback_quietly(savepoint)
            return False
        return self._handle(savepoint, exc)

    def _handle(self, savepoint: Any, exc: Exception) -> bool:
        """Roll back to the savepoint; True if the failure was a read-only one, now dropped."""
        failure = _observe(self.monitor, exc)
        if failure is not Failure.READ_ONLY:
            self._rollback_quietly(savepoint)
            return False
        savepoint.rollback()  # ROLLBACK TO SAVEPOINT: the outer transaction is usable again
        self.dropped = True
        logger.debug("dropped a write refused by the read-only database: %s", exc)
        if self.warn:
            with _warned_lock:
                first = self.warn not in _warned
                _warned.add(self.warn)
            if first:
                # sys.stderr looked up now, not at import: it may have been replaced since.
                stream = self.stream if self.stream is not None else sys.stderr
                stream.write(self.warn + "\n")
                stream.flush()
        return True

    @staticmethod
    def _rollback_quietly(savepoint: Any) -> None:
        try:
            if getattr(savepoint, "is_active", True):
                savepoint.rollback()
        except Exception as exc:  # the original error is the one to report
            logger.debug("rolling back to the savepoint failed: %s", exc)

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T | None]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
            with copy.copy(self):
                return fn(*args, **kwargs)
            return None  # reached only when the write was dropped

        return wrapper


def drop_on_read_only(
    session_or_conn: Any, warn: str | None = None, *, monitor: Any = None, stream: IO[str] | None = None
) -> DropPolicy:
    """Run the write in a SAVEPOINT; on a read-only failure roll back to it and carry on.

    ``session_or_conn`` is a SQLAlchemy ``Session`` (or ``scoped_session``) or ``Connection``;
    its transaction stays usable for reads after a dropped write (a failed statement on a
    standby would otherwise abort the whole transaction). ``warn``, if given, is written to
    ``stream`` (default stderr) the first time this process drops a write with that text;
    otherwise dropping is silent. Other errors are re-raised after rolling back the savepoint.
    As a decorator the function returns None when its write was dropped.
    """
    return DropPolicy(session_or_conn, warn, monitor=monitor, stream=stream)


def retry_until_writable(
    deadline: float | Deadline,
    *,
    idempotent: bool = False,
    session: Any = None,
    commit: bool = True,
    monitor: Any = None,
    on_wait: Callable[[RetryEvent], object] | None = None,
    log: Log = _retry_logger,
    **strategy: Any,
) -> RetryPolicy:
    """Retry a write until it succeeds; past ``deadline`` raise ``DeadlineExceeded``.

    ``deadline`` is seconds (counted from each call or loop) or a shared :class:`Deadline`.
    READ_ONLY and UNAVAILABLE failures are retried with ``backoff.expo`` waits (``factor``
    0.1 s, at most ``max_wait`` 1 s) and ``backoff.full_jitter``, each wait capped at the time
    left, so ``DeadlineExceeded`` comes at the deadline plus at most one attempt. A COMMIT
    whose outcome is unknown raises ``DatabaseUnavailable`` unless ``idempotent=True``; other
    errors pass unchanged. With ``session`` (a Session, Connection or DBAPI connection) every
    try starts with a rollback and, if ``commit``, ends with a commit that is part of the try.
    ``on_wait(event)`` is called before each wait. Waits are logged to ``log`` (default: the
    ``srht_readonly.policies`` logger) at INFO once per change of state (the first wait, the
    failure changing, the database writable again), shared by every policy logging there, and
    at DEBUG otherwise; pass another logger or adapter to send it there instead, or None
    to silence it (an ``on_wait`` of your own then says what you want). ``strategy`` may set
    ``wait_gen``, ``jitter``, ``factor``, ``max_wait`` and ``sleep``.
    """
    return RetryPolicy(
        deadline, idempotent=idempotent, session=session, commit=commit, monitor=monitor,
        on_wait=on_wait, log=log, **strategy,
    )


"""``drop_on_read_only``: a write the plan allows to lose runs in a SAVEPOINT and is rolled back to it.

Re-exported by :mod:`srht_readonly.policies`. Logs to ``srht_readonly.policies.drop`` (DEBUG:
each write dropped, and a rollback that failed).
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, ParamSpec, TypeVar

from ._outcomes import report
from .errors import Failure, classify

__all__ = ["DropPolicy", "drop_on_read_only"]

logger = logging.getLogger("srht_readonly.policies.drop")

P = ParamSpec("P")
T = TypeVar("T")

_warned: set[str] = set()
_warned_lock = threading.Lock()


def _observe(monitor: Any, exc: BaseException) -> Failure | None:
    return monitor.observe(exc) if monitor is not None else classify(exc)


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
        report("drop", "dropped", failure=failure)
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

"""``abort_on_read_only``: a write that meets a read-only database becomes ``ReadOnlyError``.

Re-exported by :mod:`srht_readonly.policies`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, ParamSpec, TypeVar

from ._outcomes import report
from ._root_error import SrhtReadOnlyError
from .errors import DatabaseUnavailable, Failure, ReadOnlyError, classify

__all__ = ["AbortPolicy", "abort_on_read_only"]

P = ParamSpec("P")
T = TypeVar("T")


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
            failure = self.monitor.state.failure or Failure.READ_ONLY
            report("abort", "refused", failure=failure, before=True)
            if failure in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
                raise DatabaseUnavailable(self.message)
            raise ReadOnlyError(self.message)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if not isinstance(exc, Exception) or isinstance(exc, SrhtReadOnlyError):
            return False
        failure = _observe(self.monitor, exc)
        if failure is not None:
            report("abort", "refused", failure=failure, before=False)
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

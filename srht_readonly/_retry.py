"""The *retry* policy: block until the write succeeds, with exponential backoff and full jitter.

Re-exported by :mod:`srht_readonly.policies`; see ``retry_until_writable`` there.

The waits come from backoff's strategies (``backoff.expo`` and ``backoff.full_jitter`` by
default, any backoff wait generator and jitter can be passed). The loop is ours, not
``backoff.on_exception``: that decorator measures time with the wall clock from the start of
each call, cannot share one deadline across calls, cannot cap a wait at the time left after a
slow attempt, and cannot drive the body of a ``with`` block.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any, ParamSpec, TypeAlias, TypedDict, TypeVar

import backoff

from ._outcomes import report
from .errors import DatabaseUnavailable, DeadlineExceeded, Failure, classify, mark_commit

logger = logging.getLogger("srht_readonly.policies.retry")

P = ParamSpec("P")
T = TypeVar("T")

#: Where a retry policy says that it waits: a logger, a ``LoggerAdapter`` (a build's own, say)
#: or None for silence.
Log: TypeAlias = "logging.Logger | logging.LoggerAdapter[Any] | None"

# What each log target was last told about the database: the failure of its last wait, absent
# once a write went through. Shared by every policy of the process that logs there, so eight
# threads blocked on one read-only database say so once, not eight times per backoff step.
_told: weakref.WeakKeyDictionary[Any, Failure] = weakref.WeakKeyDictionary()
_told_lock = threading.Lock()


def _tell(log: Log, failure: Failure | None) -> bool:
    """Record what ``log`` now knows; True if that is news (a change of state) for it."""
    if log is None:
        return False
    with _told_lock:
        before = _told.get(log)
        if failure is None:
            _told.pop(log, None)
        else:
            _told[log] = failure
    return before is not failure


class Deadline:
    """A point in time (monotonic clock) by which writes must have succeeded.

    Create one per unit of work (a build, say) and pass it to every ``retry_until_writable``
    of that unit: they share the time left.
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds < 0:
            raise ValueError("a deadline needs a non-negative number of seconds")
        self.seconds = float(seconds)
        self.clock = clock
        self.at = clock() + self.seconds

    @classmethod
    def of(cls, value: float | Deadline) -> Deadline:
        """``value`` itself if it is a Deadline, else a new one ``value`` seconds from now."""
        return value if isinstance(value, Deadline) else cls(value)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.at - self.clock())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.clock() >= self.at

    def __repr__(self) -> str:
        return f"<Deadline {self.seconds:g} s, {self.remaining():.3f} s left>"


class RetryEvent(TypedDict):
    """Handed to ``on_wait`` before each wait."""

    attempt: int
    wait: float
    remaining: float
    failure: Failure
    exception: BaseException


class _Outcome(StrEnum):
    """How an attempt ended (``None`` before it started)."""

    RUNNING = "running"
    OK = "ok"
    RETRY = "retry"


class Attempt:
    """One try of a retried write; use it as ``with attempt:`` (see ``retry_until_writable``)."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline, number: int, started: float) -> None:
        self.policy = policy
        self.deadline = deadline
        self.number = number
        self.started = started
        self.outcome: _Outcome | None = None
        self.failure: Failure | None = None
        self.exception: BaseException | None = None

    def __enter__(self) -> Attempt:
        self.outcome = _Outcome.RUNNING
        self.policy._rollback()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        session = self.policy.session
        if exc is None:
            if session is not None and self.policy.commit:
                try:
                    if hasattr(session, "flush"):
                        session.flush()  # a lost connection here is a plain failure ...
                except Exception as failed:
                    return self._failed(failed, raised=False)
                try:
                    session.commit()  # ... but here nobody knows whether the write is saved
                except Exception as failed:
                    return self._failed(mark_commit(failed), raised=False)
            self.outcome = _Outcome.OK
            return False
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt, SystemExit: not ours to retry
        return self._failed(exc, raised=True)

    def _failed(self, exc: BaseException, *, raised: bool) -> bool:
        policy = self.policy
        failure = classify(exc)
        if policy.monitor is not None and failure is not None:
            policy.monitor.observe(exc)
        self.failure, self.exception = failure, exc
        if failure is None:
            if raised:
                return False
            raise exc
        if failure is Failure.COMMIT_UNKNOWN and not policy.idempotent:
            raise DatabaseUnavailable(
                "the database connection was lost during COMMIT, so this write may or may not "
                "be saved; check before repeating it, or pass idempotent=True if repeating it "
                "is harmless",
                failure=failure,
            ) from exc
        # Release the failed transaction now: through PgBouncer it pins a server connection.
        policy._rollback()
        if self.deadline.expired:
            waited = self.deadline.clock() - self.started
            state = "read-only" if failure is Failure.READ_ONLY else "unreachable"
            report("retry", "gave_up", failure=failure, attempts=self.number, waited=waited)
            raise DeadlineExceeded(
                f"the database stayed {state} until the deadline ({waited:.1f} s, "
                f"{self.number} attempts), so the write was not saved; try again once it is "
                "writable, or allow a longer deadline",
                failure=failure, attempts=self.number, waited=waited,
            ) from exc
        self.outcome = _Outcome.RETRY
        return True


class RetryPolicy:
    """``retry_until_writable``: retry a write until it succeeds; past ``deadline`` raise ``DeadlineExceeded``.

    Iterable of attempts (``for attempt in policy: with attempt: ...``), decorator, and ``.call``.

    ``deadline`` is seconds (counted from each call or loop) or a shared :class:`Deadline`.
    READ_ONLY and UNAVAILABLE failures are retried with ``backoff.expo`` waits (``factor``
    0.1 s, at most ``max_wait`` 1 s) and ``backoff.full_jitter``, each wait capped at the time
    left, so ``DeadlineExceeded`` comes at the deadline plus at most one attempt. A COMMIT
    whose outcome is unknown raises ``DatabaseUnavailable`` unless ``idempotent=True``; other
    errors pass unchanged. With ``session`` (a Session, Connection or DBAPI connection) every
    try starts with a rollback and, if ``commit``, ends with a commit that is part of the try.
    ``on_wait(event)`` is called before each wait. Waits are logged to ``log`` (default: the
    ``srht_readonly.policies.retry`` logger) at INFO once per change of state (the first wait, the
    failure changing, the database writable again), shared by every policy logging there, and
    at DEBUG otherwise; pass another logger or adapter to send it there instead, or None
    to silence it (an ``on_wait`` of your own then says what you want). ``wait_gen``,
    ``jitter``, ``factor``, ``max_wait`` and ``sleep`` set the strategy.
    """

    def __init__(
        self,
        deadline: float | Deadline,
        *,
        idempotent: bool = False,
        session: Any = None,
        commit: bool = True,
        monitor: Any = None,
        on_wait: Callable[[RetryEvent], object] | None = None,
        log: Log = logger,
        wait_gen: Callable[..., Any] = backoff.expo,
        jitter: Callable[[float], float] | None = backoff.full_jitter,
        factor: float = 0.1,
        max_wait: float = 1.0,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.deadline = deadline
        self.idempotent = idempotent
        self.session = session
        self.commit = commit
        self.monitor = monitor
        self.on_wait = on_wait
        self.log = log
        self.wait_gen = wait_gen
        self.jitter = jitter
        self.factor = factor
        self.max_wait = max_wait
        self.sleep = sleep

    def _rollback(self) -> None:
        if self.session is None:
            return
        try:
            self.session.rollback()
        except Exception as exc:  # a dead connection: the next try will say what is wrong
            logger.debug("rollback before retrying failed: %s", exc)

    def __iter__(self) -> Iterator[Attempt]:
        deadline = Deadline.of(self.deadline)
        waits = self.wait_gen(factor=self.factor, max_value=self.max_wait)
        waits.send(None)  # backoff's generators start with a bare yield
        started = deadline.clock()
        number = 0
        while True:
            number += 1
            attempt = Attempt(self, deadline, number, started)
            yield attempt
            if attempt.outcome in (None, _Outcome.RUNNING):
                raise RuntimeError("use each attempt as `with attempt:` inside the loop")
            if attempt.outcome is _Outcome.OK:
                if _tell(self.log, None) and self.log is not None:
                    self.log.info(
                        "database writable again: the write went through (attempt %d, after %.1f s)",
                        number, deadline.clock() - started,
                    )
                return
            assert attempt.failure is not None and attempt.exception is not None
            value = min(float(next(waits)), self.max_wait)
            if self.jitter is not None:
                value = self.jitter(value)
            wait = max(0.0, min(value, deadline.remaining()))
            report("retry", "retried", failure=attempt.failure, wait=wait, attempt=number)
            if self.log is not None:
                level = logging.INFO if _tell(self.log, attempt.failure) else logging.DEBUG
                self.log.log(
                    level, "database %s; retrying the write in %.2f s (attempt %d, %.1f s left)",
                    attempt.failure.value, wait, number, deadline.remaining(),
                )
            if self.on_wait is not None:
                self.on_wait({
                    "attempt": number, "wait": wait, "remaining": deadline.remaining(),
                    "failure": attempt.failure, "exception": attempt.exception,
                })
            if wait > 0:
                self.sleep(wait)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` until it succeeds (or the policy gives up); its result."""
        for attempt in self:
            with attempt:
                result = fn(*args, **kwargs)
        return result

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Decorate ``fn`` so each call is retried; a deadline in seconds restarts per call."""

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        return wrapper

"""Celery adapter: a task that meets a read-only database fails cleanly, or defers if it asked to.

``install(celery_app, monitor=None)`` changes every task of the app (those defined before and
after the call, up to the worker's start) so that a database failure of the failover family
(``classify(exc)`` is READ_ONLY, UNAVAILABLE or COMMIT_UNKNOWN):

* **fails** the task (state FAILURE) with :class:`~srht_readonly.ReadOnlyError` or
  :class:`~srht_readonly.DatabaseUnavailable`, whose message gives the reason. The exception is
  one of the task's ``throws``, so Celery logs it as *one* line at INFO
  ("Task webhooks.async_request[...] raised expected: ReadOnlyError(...)") with no traceback;
  it never reaches an ``except Exception`` mailer that runs outside the task body;
* is **never retried** for that reason: neither by ``autoretry_for`` (even ``(Exception,)``)
  nor by an explicit ``self.retry(exc=...)``. Other errors keep Celery's behaviour;
* is **counted** per task, outcome and failure (:meth:`ReadOnlyTasks.counters`; the task
  ``srht_readonly.counters`` returns a worker process's counts).

A task may opt in to **defer** instead, for work that must not be lost::

    @app.task(on_read_only="defer", read_only_deadline=3600)
    def record_build_result(...): ...

It is then re-queued with a countdown growing from ``first`` to at most ``cap`` seconds (drawn
in ``[c/2, c]``), until the database takes writes again or ``read_only_deadline`` seconds after
its first deferral, when it fails with :class:`TaskDeadlineExceeded` (a ``DeadlineExceeded``).
The deadline travels in the message headers, so it holds across worker processes. A deferred task runs again
from the start: it must be idempotent. A COMMIT whose outcome is unknown is deferred only for
tasks that declare ``read_only_idempotent=True``; otherwise it fails. With a ``monitor`` that
already knows the database is read-only, a deferring task is re-queued without running.

Per-task options (``@app.task(...)`` keywords): ``on_read_only`` (``"fail"``, the default, or
``"defer"``), ``read_only_deadline`` (seconds), ``read_only_countdown`` (``(first, cap)``
seconds) and ``read_only_idempotent``.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from celery import Celery, signals
from celery.exceptions import TaskPredicate

from ._outcomes import report
from ._root_error import SrhtReadOnlyError
from .errors import DatabaseUnavailable, DeadlineExceeded, Failure, ReadOnlyError, classify, first_line

__all__ = ["COUNTERS_TASK", "DEFER", "FAIL", "OnReadOnly", "ReadOnlyTasks", "TaskDeadlineExceeded", "install",
           "installed"]

logger = logging.getLogger(__name__)

class OnReadOnly(StrEnum):
    """A task's ``on_read_only`` policy; plain strings (``"fail"``, ``"defer"``) work too."""

    FAIL = "fail"  # end as a clean FAILURE, one log line (the plan's "may simply fail")
    DEFER = "defer"  # retried with backoff until the database is writable, or its deadline


FAIL = OnReadOnly.FAIL
DEFER = OnReadOnly.DEFER
#: Name of the task that returns the counts of the worker process that runs it.
COUNTERS_TASK = "srht_readonly.counters"

_DEADLINE_HEADER = "srht_readonly_deadline"  # wall-clock time (epoch) after which deferring stops
_DEFERRALS_HEADER = "srht_readonly_deferrals"
_HANDLED = "_srht_readonly_handled"  # set on exceptions this module raised, so nothing counts twice
_PATCHED = "_srht_readonly_tasks"
_EXPECTED = (ReadOnlyError, DatabaseUnavailable, DeadlineExceeded)


class TaskDeadlineExceeded(DeadlineExceeded):
    """A deferring task gave up: the database stayed read-only past its ``read_only_deadline``.

    Unlike its base class it can be rebuilt from its message alone, as Celery does when it
    reads a failure back from the result backend.
    """

    def __init__(
        self, message: str, *, failure: Failure | None = Failure.READ_ONLY, attempts: int = 0, waited: float = 0.0
    ) -> None:
        super().__init__(message, failure=failure, attempts=attempts, waited=waited)


class ReadOnlyTasks:
    """What ``install`` returns: the app's read-only handling, its settings and its counters.

    Counters are per process (each prefork child counts what it ran); ``counters()`` is a
    snapshot ``{(task name, outcome, failure): count}`` with outcome ``"failed"``,
    ``"deferred"`` or ``"gave_up"`` and failure a :class:`Failure` value.
    """

    def __init__(
        self,
        app: Celery,
        monitor: Any,
        *,
        defer_deadline: float,
        defer_countdown: tuple[float, float],
    ) -> None:
        first, cap = defer_countdown
        if defer_deadline <= 0 or first <= 0 or cap < first:
            raise ValueError("defer_deadline must be positive and defer_countdown a (first, cap) with 0 < first <= cap")
        self.app = app
        self.monitor = monitor
        self.defer_deadline = float(defer_deadline)
        self.defer_countdown = (float(first), float(cap))
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    # -- counters --------------------------------------------------------------------------

    def counters(self) -> dict[tuple[str, str, str], int]:
        """A snapshot of this process's counts, keyed by (task name, outcome, failure)."""
        with self._lock:
            return dict(self._counts)

    def count(self, task: str | None = None, outcome: str | None = None, failure: str | None = None) -> int:
        """The sum of the counts matching the given task name, outcome and failure value."""
        return sum(
            n for (t, o, f), n in self.counters().items()
            if (task is None or t == task) and (outcome is None or o == outcome) and (failure is None or f == failure)
        )

    def _record(self, task: str, outcome: str, failure: Failure) -> None:
        with self._lock:
            self._counts[(task, outcome, failure.value)] += 1
        report("celery", outcome, failure=failure, task=task)

    # -- patching --------------------------------------------------------------------------

    def patch(self, task: Any) -> None:
        """Make ``task`` fail (or defer) cleanly; done once per task, Celery's own tasks excluded."""
        if getattr(task, _PATCHED, None) is not None or task.name.startswith("celery."):
            return
        setattr(task, _PATCHED, self)
        task.throws = (*tuple(getattr(task, "throws", ()) or ()), *_EXPECTED)
        # Innermost: wrap what autoretry's wrapper calls (it looks ``_orig_run`` up at each call),
        # so a read-only failure is converted before ``autoretry_for`` sees it.
        attribute = "_orig_run" if hasattr(task, "_orig_run") else "run"
        setattr(task, attribute, self._guard(task, getattr(task, attribute)))
        original_retry = task.retry
        task._srht_readonly_retry = original_retry

        @functools.wraps(original_retry)
        def retry(args: Any = None, kwargs: Any = None, exc: BaseException | None = None, *rest: Any,
                  **options: Any) -> Any:
            cause = exc if exc is not None else sys.exc_info()[1]
            if cause is not None and not isinstance(cause, TaskPredicate):
                if getattr(cause, _HANDLED, False):
                    raise cause
                failure = classify(cause)
                if failure is not None:
                    self._handle(task, cause, failure)
            return original_retry(args, kwargs, exc, *rest, **options)

        task.retry = retry

    def patch_all(self) -> None:
        for task in list(self.app.tasks.values()):
            self.patch(task)

    def _guard(self, task: Any, inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def run(*args: Any, **kwargs: Any) -> Any:
            if self._policy(task) == DEFER and self.monitor is not None and self.monitor.read_only:
                state = self.monitor.state
                failure = state.failure or Failure.READ_ONLY
                known: ReadOnlyError | DatabaseUnavailable = ReadOnlyError(
                    f"the database is read-only ({state.detail}); not run now")
                if failure is not Failure.READ_ONLY:
                    known = DatabaseUnavailable(f"the database is unreachable ({state.detail}); not run now",
                                                failure=failure)
                self._defer(task, known, failure)
            try:
                return inner(*args, **kwargs)
            except TaskPredicate:  # Retry, Ignore, Reject: Celery's own control flow
                raise
            except Exception as exc:
                if getattr(exc, _HANDLED, False):
                    raise
                failure = self.monitor.observe(exc) if self.monitor is not None else classify(exc)
                if failure is None:
                    raise
                self._handle(task, exc, failure)
                raise  # not reached: _handle always raises

        return run

    # -- policy ----------------------------------------------------------------------------

    @staticmethod
    def _policy(task: Any) -> OnReadOnly:
        policy = getattr(task, "on_read_only", FAIL) or FAIL
        try:
            return OnReadOnly(policy)
        except ValueError:
            raise ValueError(f"task {task.name}: on_read_only must be 'fail' or 'defer', not {policy!r}") from None

    def _handle(self, task: Any, exc: BaseException, failure: Failure) -> None:
        """Fail or defer ``task`` for ``exc``; always raises."""
        deferrable = failure is not Failure.COMMIT_UNKNOWN or getattr(task, "read_only_idempotent", False)
        if self._policy(task) == DEFER and deferrable:
            self._defer(task, exc, failure)
        self._record(task.name, "failed", failure)
        if isinstance(exc, _EXPECTED):
            raise _mark(exc)
        raise _mark(_converted(exc, failure, "the task failed and is not retried")) from exc

    def _defer(self, task: Any, exc: BaseException, failure: Failure) -> None:
        """Re-queue ``task`` with a bounded countdown, or give up past its deadline; raises."""
        request = task.request
        headers = dict(request.headers or {})
        now = time.time()
        deadline_at = _header(request, headers, _DEADLINE_HEADER)
        deferrals = int(_header(request, headers, _DEFERRALS_HEADER) or 0)
        seconds = float(getattr(task, "read_only_deadline", None) or self.defer_deadline)
        if deadline_at is None:
            deadline_at = now + seconds
        if now >= deadline_at:
            self._record(task.name, "gave_up", failure)
            state = "read-only" if failure is Failure.READ_ONLY else "unreachable"
            raise _mark(TaskDeadlineExceeded(
                f"the database stayed {state} for the task's whole deferral deadline ({seconds:g} s, "
                f"{deferrals} deferrals), so the task failed; run it again once the database takes writes",
                failure=failure, attempts=deferrals + 1, waited=seconds,
            )) from exc
        first, cap = getattr(task, "read_only_countdown", None) or self.defer_countdown
        ceiling = min(float(cap), float(first) * 2.0 ** min(deferrals, 32))
        countdown = round(min(ceiling * random.uniform(0.5, 1.0), max(0.0, deadline_at - now)), 2)
        headers[_DEADLINE_HEADER] = deadline_at
        headers[_DEFERRALS_HEADER] = deferrals + 1
        self._record(task.name, "deferred", failure)
        reason = exc if isinstance(exc, _EXPECTED) else _converted(exc, failure, "deferred")
        try:
            task._srht_readonly_retry(
                exc=_mark(reason), countdown=countdown, max_retries=request.retries + 1, headers=headers,
            )
        finally:
            # Task.retry leaves this behind for autoretry's wrapper, which we bypass.
            if "override_max_retries" in vars(task):
                del task.override_max_retries


def _header(request: Any, headers: dict[str, Any], name: str) -> Any:
    # Celery hands custom headers over both ways, depending on protocol and version.
    value = headers.get(name)
    return value if value is not None else getattr(request, name, None)


def _mark(exc: BaseException) -> BaseException:
    setattr(exc, _HANDLED, True)
    return exc


def _converted(exc: BaseException, failure: Failure, outcome: str) -> SrhtReadOnlyError:
    reason = first_line(exc)
    if failure is Failure.READ_ONLY:
        return ReadOnlyError(f"the database is read-only ({reason}); {outcome}")
    if failure is Failure.COMMIT_UNKNOWN:
        return DatabaseUnavailable(
            f"the connection was lost during COMMIT, so the write may or may not be saved ({reason}); {outcome}",
            failure=failure,
        )
    return DatabaseUnavailable(f"the database is unreachable ({reason}); {outcome}", failure=failure)


def installed(celery_app: Celery) -> ReadOnlyTasks | None:
    """The :class:`ReadOnlyTasks` that ``install`` attached to ``celery_app``, if any."""
    return getattr(celery_app, _PATCHED, None)


def install(
    celery_app: Celery,
    monitor: Any = None,
    *,
    defer_deadline: float = 3600.0,
    defer_countdown: tuple[float, float] = (1.0, 60.0),
    counters_task: bool = True,
) -> ReadOnlyTasks:
    """Make ``celery_app``'s tasks fail cleanly (or defer) on a read-only database; see the module.

    ``monitor`` (a :class:`~srht_readonly.ReadOnlyMonitor`) is told of every failure, and lets a
    deferring task skip running while the database is known to be read-only.
    ``defer_deadline`` and ``defer_countdown`` are the defaults of deferring tasks. With
    ``counters_task``, the task ``srht_readonly.counters`` is registered. Tasks defined after
    the worker started are not covered. Installing twice on one app raises ``RuntimeError``.
    """
    if installed(celery_app) is not None:
        raise RuntimeError("srht_readonly.celery.install() was already called on this Celery app")
    tasks = ReadOnlyTasks(celery_app, monitor, defer_deadline=defer_deadline, defer_countdown=defer_countdown)
    setattr(celery_app, _PATCHED, tasks)

    if counters_task:
        @celery_app.task(name=COUNTERS_TASK, shared=False)
        def counters() -> dict[str, Any]:
            """This worker process's read-only counts (see ``ReadOnlyTasks.counters``)."""
            return {
                "hostname": socket.gethostname(),
                "pid": os.getpid(),
                "counters": [
                    {"task": t, "outcome": o, "failure": f, "count": n}
                    for (t, o, f), n in sorted(tasks.counters().items())
                ],
            }

    def on_finalize(sender: Any = None, **_: Any) -> None:
        tasks.patch_all()

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        # Runs before the worker builds its tracers (they capture ``task.run``).
        if getattr(sender, "app", None) is celery_app:
            tasks.patch_all()

    celery_app.on_after_finalize.connect(on_finalize, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    if celery_app.finalized:
        tasks.patch_all()
    return tasks

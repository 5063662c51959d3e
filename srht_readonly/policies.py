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

from ._abort import AbortPolicy, abort_on_read_only
from ._drop import DropPolicy, drop_on_read_only
from ._retry import Attempt, Deadline, RetryEvent, RetryPolicy

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

#: ``retry_until_writable(deadline, *, idempotent=False, session=None, commit=True, monitor=None,
#: on_wait=None, log=<srht_readonly.policies logger>, wait_gen, jitter, factor, max_wait, sleep)``:
#: the policy itself, so its signature is written once (see ``RetryPolicy``).
retry_until_writable = RetryPolicy

"""Classify database failures seen during a PostgreSQL failover, and the exceptions we raise.

``classify(exc)`` answers one question: is this exception the database refusing writes
(``Failure.READ_ONLY``), the database going away (``Failure.UNAVAILABLE``), or a COMMIT whose
outcome nobody knows (``Failure.COMMIT_UNKNOWN``)? Anything else is ``None`` and is none of
this package's business.

The answer comes from one table keyed by SQLSTATE, with a fallback on the two-character class
(as psycopg does for ``"08"``), plus the messages of the client-side errors that carry no
SQLSTATE at all (psycopg2 reports a terminated backend or a refused connection that way).
Wrappers are walked: SQLAlchemy's ``.orig``, ``__cause__``/``__context__`` and Flask's
``InternalServerError.original_exception`` (duck-typed; Flask is never imported).

A connection lost during COMMIT cannot be told from any other lost connection by its SQLSTATE
or message, so it is detected by *where* it happened: an exception is a COMMIT failure if it was
marked with :func:`mark_commit` (done by ``srht_readonly.sqlalchemy.instrument`` for every
DBAPI ``commit()``, and by ``retry_until_writable`` for the commit it performs), or if the
SQL statement that failed, as SQLAlchemy reports it, is ``COMMIT``/``END``.
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator

from ._root_error import SrhtReadOnlyError

__all__ = [
    "DatabaseUnavailable",
    "DeadlineExceeded",
    "Failure",
    "ReadOnlyError",
    "classify",
    "first_line",
    "mark_commit",
]


class Failure(enum.Enum):
    """What a failover-related database failure means for the code that hit it."""

    #: The database refuses writes (hot standby, ``default_transaction_read_only``). Retryable.
    READ_ONLY = "read_only"
    #: The connection or the server went away (shutdown, crash, refused, PgBouncer). Retryable.
    UNAVAILABLE = "unavailable"
    #: The connection was lost during COMMIT: the write may or may not be saved. Never retried
    #: unless the write is idempotent.
    COMMIT_UNKNOWN = "commit_unknown"


class ReadOnlyError(SrhtReadOnlyError):
    """The database is read-only, so this action was refused; ``str()`` is for the user.

    Raised by ``abort_on_read_only`` (and adapters) with the original database error as
    ``__cause__``. Adapters present it to the user: a 503 page, SSH stderr, a failed task.
    """

    def __init__(self, message: str, *, failure: Failure | None = Failure.READ_ONLY) -> None:
        super().__init__(message)
        self.message = message
        self.failure = failure


class DatabaseUnavailable(SrhtReadOnlyError):
    """The database could not be reached, or a COMMIT's outcome is unknown (see ``failure``).

    ``failure`` is ``Failure.UNAVAILABLE`` or ``Failure.COMMIT_UNKNOWN``; the original database
    error is ``__cause__``.
    """

    def __init__(self, message: str, *, failure: Failure | None = Failure.UNAVAILABLE) -> None:
        super().__init__(message)
        self.message = message
        self.failure = failure


class DeadlineExceeded(SrhtReadOnlyError):
    """``retry_until_writable`` gave up: the database stayed read-only or away until the deadline.

    ``failure`` is the classification of the last error (its exception is ``__cause__``),
    ``attempts`` how many tries were made and ``waited`` the seconds spent since the first.
    Like every exception of the package it pickles (Celery sends it between processes): only
    ``message`` is positional and every field travels in ``__dict__``.
    """

    def __init__(
        self,
        message: str,
        *,
        failure: Failure | None = None,
        attempts: int = 0,
        waited: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.failure = failure
        self.attempts = attempts
        self.waited = waited


# One table: SQLSTATE (or two-character class) -> (failure, required message fragment or None).
# An explicit ``None`` failure stops the class fallback: 57014 (statement cancelled) is class 57
# but no failover, and a recovery conflict (40001) is a standby doing its job.
_SQLSTATE: dict[str, tuple[Failure | None, str | None]] = {
    "25006": (Failure.READ_ONLY, None),  # read_only_sql_transaction
    "0A000": (Failure.READ_ONLY, "during recovery"),  # SET TRANSACTION READ WRITE on a standby
    "55000": (Failure.READ_ONLY, "recovery is in progress"),  # WAL functions on a standby
    "XX000": (Failure.READ_ONLY, "during recovery"),  # "cannot assign TransactionIds during recovery"
    "57P01": (Failure.UNAVAILABLE, None),  # admin_shutdown: fast shutdown, pg_terminate_backend
    "57P02": (Failure.UNAVAILABLE, None),  # crash_shutdown
    "57P03": (Failure.UNAVAILABLE, None),  # cannot_connect_now: starting up, shutting down
    "57014": (None, None),  # query_canceled: statement_timeout, pg_cancel_backend
    "40001": (None, None),  # serialization failure, recovery conflict on a standby
    "08007": (Failure.COMMIT_UNKNOWN, None),  # transaction_resolution_unknown
    "08": (Failure.UNAVAILABLE, None),  # connection exception (and PgBouncer's 08P01)
}

# Client-side errors with no SQLSTATE, matched on the lower-cased message, first match wins.
_MESSAGES: tuple[tuple[str, Failure | None], ...] = (
    ("conflict with recovery", None),
    ("server closed the connection", Failure.UNAVAILABLE),
    ("terminating connection", Failure.UNAVAILABLE),
    ("connection refused", Failure.UNAVAILABLE),
    ("could not connect", Failure.UNAVAILABLE),
    ("connection to server", Failure.UNAVAILABLE),  # libpq 14+: 'connection to server at ... failed'
    ("the database system is", Failure.UNAVAILABLE),  # starting up / shutting down / in recovery
    ("ssl syscall error", Failure.UNAVAILABLE),
    ("ssl connection has been closed", Failure.UNAVAILABLE),
    ("eof detected", Failure.UNAVAILABLE),
    ("could not receive data", Failure.UNAVAILABLE),
    ("could not send data", Failure.UNAVAILABLE),
    ("no connection to the server", Failure.UNAVAILABLE),
    ("lost synchronization with server", Failure.UNAVAILABLE),
    ("connection already closed", Failure.UNAVAILABLE),  # psycopg2, using a dead connection
    ("the connection is closed", Failure.UNAVAILABLE),  # psycopg 3, using a dead connection
    ("the connection is lost", Failure.UNAVAILABLE),  # psycopg 3
    ("consuming input failed", Failure.UNAVAILABLE),  # psycopg 3
    ("sending query failed", Failure.UNAVAILABLE),  # psycopg 3
    ("timeout expired", Failure.UNAVAILABLE),  # libpq connect_timeout, psycopg 3 ConnectionTimeout
)

_COMMIT_STATEMENT = re.compile(r"^\s*(commit|end)\b", re.IGNORECASE)
_COMMIT_MARK = "_srht_readonly_during_commit"
_MAX_DEPTH = 32


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a psycopg2 (``pgcode``) or psycopg 3 (``sqlstate``) error, if any."""
    for attr in ("sqlstate", "pgcode"):
        code = getattr(exc, attr, None)
        if isinstance(code, str) and code:
            return code
    diag = getattr(exc, "diag", None)
    code = getattr(diag, "sqlstate", None)
    return code if isinstance(code, str) and code else None


def _is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a psycopg2 or psycopg 3 error (duck-typed)."""
    return hasattr(exc, "pgcode") or hasattr(exc, "sqlstate")


def _by_sqlstate(code: str, message: str) -> Failure | None:
    for key in (code, code[:2]):
        rule = _SQLSTATE.get(key)
        if rule is None:
            continue
        failure, fragment = rule
        if fragment is None or fragment in message:
            return failure
        return None
    return None


def _by_message(message: str) -> Failure | None:
    for fragment, failure in _MESSAGES:
        if fragment in message:
            return failure
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """Every exception reachable from ``exc`` through the wrappers we know, outermost first."""
    seen: set[int] = set()
    todo = [exc]
    while todo and len(seen) < _MAX_DEPTH:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for attr in ("orig", "original_exception", "__cause__", "__context__"):
            nxt = getattr(current, attr, None)
            if isinstance(nxt, BaseException) and id(nxt) not in seen:
                todo.append(nxt)


def _decide(exc: BaseException) -> tuple[bool, Failure | None]:
    """(decisive, failure) for one exception of the chain, ignoring its wrappers."""
    if isinstance(exc, SrhtReadOnlyError):
        failure = getattr(exc, "failure", None)
        return (failure is not None, failure)
    if not _is_driver_error(exc):
        return (False, None)
    message = str(exc).lower()
    code = _sqlstate(exc)
    if code is not None:
        return (True, _by_sqlstate(code, message))
    return (True, _by_message(message))


def _during_commit(exc: BaseException) -> bool:
    if getattr(exc, _COMMIT_MARK, False):
        return True
    statement = getattr(exc, "statement", None)
    return isinstance(statement, str) and bool(_COMMIT_STATEMENT.match(statement))


def classify(exc: BaseException | None, *, during_commit: bool = False) -> Failure | None:
    """What ``exc`` means for a failover: a :class:`Failure`, or ``None`` if it is no such failure.

    The first database error found walking the wrappers (outermost first) decides. A lost
    connection becomes ``Failure.COMMIT_UNKNOWN`` when it happened during COMMIT: pass
    ``during_commit=True`` if you know it did, or see :func:`mark_commit`.
    """
    if exc is None:
        return None
    committing = during_commit
    for node in _chain(exc):
        committing = committing or _during_commit(node)
        decisive, failure = _decide(node)
        if decisive:
            if failure is Failure.UNAVAILABLE and committing:
                return Failure.COMMIT_UNKNOWN
            return failure
    return None


def mark_commit(exc: BaseException) -> BaseException:
    """Record that ``exc`` was raised by a COMMIT, so a lost connection classifies as unknown.

    Returns ``exc`` (so ``raise mark_commit(exc)`` works). Exceptions that refuse new
    attributes are left as they are.
    """
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _COMMIT_MARK, True)
    return exc


def first_line(exc: BaseException) -> str:
    """The first line of the driver's message for ``exc`` (not SQLAlchemy's wrapping of it), for logs."""
    exc = getattr(exc, "orig", None) or exc
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__

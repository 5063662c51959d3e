"""SQLAlchemy hook: every database error of a service reaches its ``ReadOnlyMonitor``.

``instrument(engine, monitor)`` listens on the engine's events (like Flask-SQLAlchemy's
``record_queries``):

* ``handle_error`` feeds every DBAPI error, wherever it happens, to ``monitor.observe``;
* a lost connection (``UNAVAILABLE``, ``COMMIT_UNKNOWN``) is flagged as a disconnect, so
  SQLAlchemy discards it and recycles every older connection of the pool: connections left on
  a demoted or dead node are not handed out again;
* a read-only refusal soft-invalidates its connection: the current transaction carries on (so a
  ``drop_on_read_only`` savepoint can still be rolled back to) and the connection is replaced
  at its next checkout, reaching whatever node is primary by then;
* ``commit`` marks the connection, so an error raised by the DBAPI ``commit()`` classifies as
  ``Failure.COMMIT_UNKNOWN`` when the connection was lost (``errors.mark_commit``);
* the monitor probes through the same engine.

Nothing here keeps session state on the server: no ``SET``, no ``LISTEN``, no prepared
statements, so it works through PgBouncer in transaction mode. (With psycopg 3 behind
PgBouncer older than 1.21, also pass ``connect_args={"prepare_threshold": None}`` to
``create_engine``: psycopg 3 prepares a statement it runs five times.)
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from .errors import Failure, mark_commit
from .monitor import ReadOnlyMonitor

__all__ = ["instrument", "is_instrumented"]

logger = logging.getLogger(__name__)

_INSTRUMENTED = "_srht_readonly_monitor"


def is_instrumented(engine: Engine) -> bool:
    """Whether ``instrument`` was already called on ``engine``."""
    return getattr(engine, _INSTRUMENTED, None) is not None


def instrument(engine: Engine, monitor: ReadOnlyMonitor) -> Engine:
    """Connect ``engine``'s errors to ``monitor`` and give the monitor the engine to probe.

    Returns the engine. Instrumenting the same engine twice with the same monitor does
    nothing; with another monitor it raises ``ValueError`` (one monitor per process).
    """
    current = getattr(engine, _INSTRUMENTED, None)
    if current is monitor:
        return engine
    if current is not None:
        raise ValueError("this engine already reports to another ReadOnlyMonitor")
    setattr(engine, _INSTRUMENTED, monitor)
    if monitor.engine is None:
        monitor.use_engine(engine)

    # Connections whose DBAPI commit() is under way (``Connection.info`` is unusable once a
    # connection is invalidated, so the flag lives here).
    committing: weakref.WeakSet[Connection] = weakref.WeakSet()
    lock = threading.Lock()

    def on_commit(conn: Connection) -> None:
        with lock:
            committing.add(conn)

    def on_transaction_end(conn: Connection, *args: Any) -> None:
        with lock:
            committing.discard(conn)

    def was_committing(conn: Connection) -> bool:
        with lock:
            found = conn in committing
            committing.discard(conn)
        return found

    def on_error(ctx: ExceptionContext) -> None:
        exc = ctx.original_exception
        conn = ctx.connection
        # The DBAPI commit() is the only failing call with no statement on a marked connection.
        if conn is not None and ctx.statement is None and was_committing(conn):
            mark_commit(exc)
            if ctx.sqlalchemy_exception is not None:
                mark_commit(ctx.sqlalchemy_exception)
        failure = monitor.observe(exc)
        if failure in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
            ctx.is_disconnect = True
        elif failure is Failure.READ_ONLY and conn is not None and not conn.invalidated:
            try:
                conn.connection.invalidate(exc, soft=True)
            except Exception as failed:  # already closed: nothing left to recycle
                logger.debug("soft invalidation failed: %s", failed)

    event.listen(engine, "commit", on_commit)
    event.listen(engine, "begin", on_transaction_end)
    event.listen(engine, "rollback", on_transaction_end)
    event.listen(engine, "handle_error", on_error)
    return engine

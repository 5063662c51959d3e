"""SQLAlchemy hook: every database error of a service reaches its ``ReadOnlyMonitor``.

``instrument(engine, monitor)`` costs nothing on a healthy transaction: it adds no per-statement
or per-transaction event, only code that runs when something fails (like Flask-SQLAlchemy's
``record_queries``, one small ``_listen``):

* ``handle_error`` feeds every DBAPI error, wherever it happens, to ``monitor.observe``;
* a lost connection (``UNAVAILABLE``, ``COMMIT_UNKNOWN``) is flagged as a disconnect, so
  SQLAlchemy discards it and recycles every older connection of the pool: connections left on
  a demoted or dead node are not handed out again;
* a read-only refusal soft-invalidates its connection: the current transaction carries on (so a
  ``drop_on_read_only`` savepoint can still be rolled back to) and the connection is replaced
  at its next checkout, reaching whatever node is primary by then;
* the dialect's ``do_commit`` is wrapped: an error raised by the DBAPI ``commit()`` is marked
  (``errors.mark_commit``) before SQLAlchemy handles it, so a connection lost there classifies
  as ``Failure.COMMIT_UNKNOWN``. On success the wrapper costs one extra function call;
* the monitor probes through the same engine; ``monitor_of(engine)`` gives it back.

``track_writes(engine)`` (the Flask adapter calls it when its transparent retry is on) records
into the current ``srht_readonly.rerun.Ledger`` whether a request sent a statement that writes
and whether such a transaction reached COMMIT: one extra Python call and a cached lookup per
statement, nothing at all outside a request that records.

Behind PgBouncer in transaction mode nothing may keep session state on the server: no ``SET``,
no ``LISTEN``, no prepared statements. ``create_engine(url)`` (or ``pgbouncer_safe_url``) makes
sure the driver does not prepare: a bare ``postgresql://`` means psycopg2 (SQLAlchemy 2.1 would
pick psycopg 3, which prepares a statement it has run five times, which PgBouncer before 1.21
cannot route), and a psycopg 3 engine gets ``prepare_threshold=None``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect, Engine, ExceptionContext

from . import rerun
from .errors import Failure, mark_commit
from .monitor import ReadOnlyMonitor

__all__ = ["create_engine", "instrument", "is_instrumented", "monitor_of", "pgbouncer_safe_url", "track_writes"]

logger = logging.getLogger(__name__)

# Kept on the dialect, which an engine shares with its ``execution_options()`` copies and which
# holds the ``handle_error`` listener: what is instrumented is the dialect.
_MONITOR = "_srht_readonly_monitor"
_WRAPPED_COMMIT = "_srht_readonly_commit_wrapped"
_TRACKED = "_srht_readonly_writes_tracked"
_BARE = ("postgresql", "postgres")


def monitor_of(engine: Engine) -> ReadOnlyMonitor | None:
    """The monitor ``instrument`` connected ``engine`` to, or None if it was not instrumented.

    Works for the engine's ``execution_options()`` copies too.
    """
    monitor: ReadOnlyMonitor | None = getattr(engine.dialect, _MONITOR, None)
    return monitor


def is_instrumented(engine: Engine) -> bool:
    """Whether ``instrument`` was already called on ``engine``."""
    return monitor_of(engine) is not None


def instrument(engine: Engine, monitor: ReadOnlyMonitor) -> Engine:
    """Connect ``engine``'s errors to ``monitor`` and give the monitor the engine to probe.

    Returns the engine. Instrumenting the same engine twice with the same monitor does
    nothing; with another monitor it raises ``ValueError`` (one monitor per process).
    """
    dialect = engine.dialect
    current = monitor_of(engine)
    if current is monitor:
        return engine
    if current is not None:
        raise ValueError("this engine already reports to another ReadOnlyMonitor")
    setattr(dialect, _MONITOR, monitor)
    if monitor.engine is None:
        monitor.use_engine(engine)
    _wrap_commit(dialect)

    def on_error(ctx: ExceptionContext) -> None:
        exc = ctx.original_exception
        conn = ctx.connection
        failure = monitor.observe(exc)
        if failure in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
            ctx.is_disconnect = True
        elif failure is Failure.READ_ONLY and conn is not None and not conn.invalidated:
            try:
                conn.connection.invalidate(exc, soft=True)
            except Exception as failed:  # already closed: nothing left to recycle
                logger.debug("soft invalidation failed: %s", failed)

    event.listen(engine, "handle_error", on_error)
    return engine


def _wrap_commit(dialect: Dialect) -> None:
    """Mark every error of the DBAPI ``commit()`` as a COMMIT failure (``errors.mark_commit``).

    ``Connection`` calls ``dialect.do_commit`` and hands its error to ``handle_error`` with no
    statement, exactly as it does a failed ROLLBACK, so *where* it failed is only known here.
    An instance attribute shadows the class's method; SQLAlchemy looks it up at every commit.
    """
    if getattr(dialect, _WRAPPED_COMMIT, False):
        return
    do_commit = dialect.do_commit

    def do_commit_marked(dbapi_connection: Any) -> None:
        try:
            do_commit(dbapi_connection)
        except BaseException as exc:
            mark_commit(exc)
            raise

    dialect.do_commit = do_commit_marked  # type: ignore[method-assign]
    setattr(dialect, _WRAPPED_COMMIT, True)


def track_writes(engine: Engine) -> Engine:
    """Feed every statement, COMMIT and ROLLBACK of ``engine`` to the current ``rerun.Ledger``.

    What a request did decides whether it may be re-run after a lost connection
    (``srht_readonly.rerun.why_not``). The dialect's ``do_execute``, ``do_execute_no_params``,
    ``do_executemany``, ``do_commit`` and ``do_rollback`` are wrapped (as ``instrument`` wraps
    ``do_commit``; no SQLAlchemy event, which would slow every statement down): each call
    costs a context-variable read, and, while a ledger records, a cached look at the statement's
    first keyword. Statements run by other threads (the monitor's probe among them) are not
    recorded. Idempotent; returns the engine.
    """
    dialect = engine.dialect
    if getattr(dialect, _TRACKED, False):
        return engine
    current = rerun.LEDGER.get
    is_write = rerun.is_write
    do_execute, do_execute_no_params = dialect.do_execute, dialect.do_execute_no_params
    do_executemany, do_commit, do_rollback = dialect.do_executemany, dialect.do_commit, dialect.do_rollback

    # Each wrapper is one call and a context-variable read when nothing records; kept flat, as
    # they run for every statement.
    def execute(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        ledger = current()
        if ledger is not None and is_write(statement):
            ledger.write(cursor.connection)
        do_execute(cursor, statement, parameters, context)

    def execute_no_params(cursor: Any, statement: str, context: Any = None) -> None:
        ledger = current()
        if ledger is not None and is_write(statement):
            ledger.write(cursor.connection)
        do_execute_no_params(cursor, statement, context)

    def executemany(cursor: Any, statement: str, parameters: Any, context: Any = None) -> None:
        ledger = current()
        if ledger is not None and is_write(statement):
            ledger.write(cursor.connection)
        do_executemany(cursor, statement, parameters, context)

    def commit(dbapi_connection: Any) -> None:
        ledger = current()
        if ledger is not None:
            ledger.commit(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))
        do_commit(dbapi_connection)

    def rollback(dbapi_connection: Any) -> None:
        ledger = current()
        if ledger is not None:
            ledger.rollback(getattr(dbapi_connection, "dbapi_connection", dbapi_connection))
        do_rollback(dbapi_connection)

    dialect.do_execute = execute  # type: ignore[method-assign]
    dialect.do_execute_no_params = execute_no_params  # type: ignore[method-assign]
    dialect.do_executemany = executemany  # type: ignore[method-assign]
    dialect.do_commit = commit  # type: ignore[method-assign]
    dialect.do_rollback = rollback  # type: ignore[method-assign]
    setattr(dialect, _TRACKED, True)
    return engine


def pgbouncer_safe_url(url: str | URL) -> URL:
    """``url`` with a driver that never prepares statements behind PgBouncer.

    A bare ``postgresql://`` (or ``postgres://``) becomes ``postgresql+psycopg2://``, the driver
    SourceHut's services run, or ``postgresql+psycopg://`` if psycopg2 is not installed (then
    pass the engine ``prepare_threshold=None``, as :func:`create_engine` does). A URL naming its
    driver is returned unchanged.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in _BARE:
        driver = "psycopg2" if importlib.util.find_spec("psycopg2") is not None else "psycopg"
        parsed = parsed.set(drivername=f"postgresql+{driver}")
    return parsed


def create_engine(url: str | URL, *, monitor: ReadOnlyMonitor | None = None, **options: Any) -> Engine:
    """``sqlalchemy.create_engine`` made safe for PgBouncer in transaction mode, and instrumented.

    The URL goes through :func:`pgbouncer_safe_url`; a psycopg 3 engine also gets
    ``connect_args={"prepare_threshold": None}`` (unless ``connect_args`` sets it), so that no
    statement is ever prepared on a PgBouncer server connection. ``options`` go to SQLAlchemy;
    with ``monitor``, the engine is passed to :func:`instrument`.
    """
    target = pgbouncer_safe_url(url)
    if target.get_driver_name() == "psycopg":
        connect_args = dict(options.get("connect_args") or {})
        connect_args.setdefault("prepare_threshold", None)
        options["connect_args"] = connect_args
    engine = sa.create_engine(target, **options)
    if monitor is not None:
        instrument(engine, monitor)
    return engine

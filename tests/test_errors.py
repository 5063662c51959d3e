"""classify(): the SQLSTATE table (pure), and every row of REFERENCE's table produced for real."""

from __future__ import annotations

import contextlib
import pickle
import threading
from typing import Any

import psycopg
import psycopg2
import pytest
import sqlalchemy as sa
from celery.utils.serialization import get_pickleable_exception
from sqlalchemy.pool import NullPool

from srht_readonly import (
    DatabaseUnavailable,
    DeadlineExceeded,
    Failure,
    ReadOnlyError,
    ReadOnlyMonitor,
    SrhtReadOnlyError,
    classify,
)
from srht_readonly.errors import mark_commit
from srht_readonly.sqlalchemy import instrument
from tests._db import admin, commit_trigger, error_of, wait_for
from tests._fakes import Pg2Error


def pg3(code: str, message: str) -> psycopg.Error:
    return psycopg.errors.lookup(code)(message)


# --- the table, without a server --------------------------------------------------------------

TABLE = [
    ("25006", "cannot execute INSERT in a read-only transaction", Failure.READ_ONLY),
    ("0A000", "cannot set transaction read-write mode during recovery", Failure.READ_ONLY),
    ("0A000", "cannot use this feature", None),
    ("55000", "recovery is in progress", Failure.READ_ONLY),
    ("57P01", "terminating connection due to administrator command", Failure.UNAVAILABLE),
    ("57P02", "terminating connection because of crash of another server process", Failure.UNAVAILABLE),
    ("57P03", "the database system is starting up", Failure.UNAVAILABLE),
    ("08006", "connection failure", Failure.UNAVAILABLE),
    ("08P01", "server conn crashed?", Failure.UNAVAILABLE),  # PgBouncer
    ("08001", "could not connect", Failure.UNAVAILABLE),
    ("08007", "transaction resolution unknown", Failure.COMMIT_UNKNOWN),
    ("40001", "canceling statement due to conflict with recovery", None),
    ("57014", "canceling statement due to statement timeout", None),
    ("57P04", "database dropped", None),
    ("42601", 'syntax error at or near "SELEC"', None),
    ("23505", "duplicate key value violates unique constraint", None),
]


@pytest.mark.parametrize(("code", "message", "expected"), TABLE)
def test_sqlstate_table_for_psycopg2_shaped_errors(code, message, expected):
    assert classify(Pg2Error(message, code)) is expected


@pytest.mark.parametrize(("code", "message", "expected"), TABLE)
def test_sqlstate_table_for_psycopg3_errors(code, message, expected):
    error = pg3(code, message)
    assert error.sqlstate == code
    assert classify(error) is expected


MESSAGES = [
    ("server closed the connection unexpectedly\n\tThis probably means the server terminated "
     "abnormally\n\tbefore or while processing the request.", Failure.UNAVAILABLE),
    ('connection to server at "127.0.0.1", port 5432 failed: Connection refused\n\tIs the server '
     "running on that host and accepting TCP/IP connections?", Failure.UNAVAILABLE),
    ("could not connect to server: No such file or directory", Failure.UNAVAILABLE),
    ("terminating connection due to administrator command\nserver closed the connection "
     "unexpectedly", Failure.UNAVAILABLE),
    ("SSL SYSCALL error: EOF detected", Failure.UNAVAILABLE),
    ("connection already closed", Failure.UNAVAILABLE),
    ("the connection is closed", Failure.UNAVAILABLE),
    ("consuming input failed: server closed the connection unexpectedly", Failure.UNAVAILABLE),
    ("FATAL:  the database system is shutting down", Failure.UNAVAILABLE),
    ("timeout expired", Failure.UNAVAILABLE),
    ("terminating connection due to conflict with recovery", None),
    ("password authentication failed for user \"srht\"", None),
    ("invalid dsn", None),
]


@pytest.mark.parametrize(("message", "expected"), MESSAGES)
def test_sqlstate_less_client_errors_are_recognised_by_message(message, expected):
    assert classify(Pg2Error(message)) is expected
    assert classify(psycopg.OperationalError(message)) is expected


def test_plain_python_errors_are_none_even_with_a_matching_message():
    assert classify(RuntimeError("server closed the connection unexpectedly")) is None
    assert classify(None) is None


def test_sqlalchemy_wrapper_is_walked_through_orig():
    wrapped = sa.exc.OperationalError("INSERT INTO t VALUES (1)", {}, Pg2Error("x", "25006"))
    assert classify(wrapped) is Failure.READ_ONLY
    internal = sa.exc.InternalError("SELECT 1", {}, pg3("57P01", "terminating connection"))
    assert classify(internal) is Failure.UNAVAILABLE


def test_cause_and_context_are_walked():
    original = Pg2Error("cannot execute UPDATE in a read-only transaction", "25006")
    try:
        try:
            raise original
        except Pg2Error as exc:
            raise KeyError("lookup after the failure") from exc
    except KeyError as outer:
        assert classify(outer) is Failure.READ_ONLY
    try:
        try:
            raise original
        except Pg2Error:
            raise ValueError("raised while handling it") from None
    except ValueError as outer:
        # ``from None`` hides the context from tracebacks, not from the chain we walk.
        assert classify(outer) is Failure.READ_ONLY


def test_flask_internal_server_error_is_walked_through_original_exception():
    from werkzeug.exceptions import InternalServerError

    original = sa.exc.OperationalError("INSERT", {}, pg3("25006", "read-only transaction"))
    assert classify(InternalServerError(original_exception=original)) is Failure.READ_ONLY

    class Duck(Exception):
        original_exception = Pg2Error("server closed the connection unexpectedly")

    assert classify(Duck()) is Failure.UNAVAILABLE


def test_outermost_database_error_decides():
    inner = Pg2Error("cannot execute INSERT in a read-only transaction", "25006")
    outer = Pg2Error("server closed the connection unexpectedly")
    outer.__context__ = inner  # e.g. the ROLLBACK after the refusal lost the connection
    assert classify(outer) is Failure.UNAVAILABLE
    syntax = Pg2Error("syntax error", "42601")
    syntax.__context__ = inner
    assert classify(syntax) is None


def test_cyclic_chains_terminate():
    a, b = Pg2Error("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert classify(b) is None


def test_lost_connection_during_commit_is_commit_unknown():
    lost = Pg2Error("server closed the connection unexpectedly")
    assert classify(lost) is Failure.UNAVAILABLE
    assert classify(lost, during_commit=True) is Failure.COMMIT_UNKNOWN
    assert classify(mark_commit(Pg2Error("server closed the connection unexpectedly"))) is (
        Failure.COMMIT_UNKNOWN
    )
    # A refusal at COMMIT time is a refusal: nothing was saved, retrying is safe.
    assert classify(Pg2Error("read-only", "25006"), during_commit=True) is Failure.READ_ONLY
    # SQLAlchemy reports the failing SQL: a COMMIT issued as a statement counts too.
    wrapped = sa.exc.OperationalError("COMMIT", {}, Pg2Error("server closed the connection"))
    assert classify(wrapped) is Failure.COMMIT_UNKNOWN
    wrapped = sa.exc.OperationalError("commit prepared 'x'", {}, Pg2Error("server closed the connection"))
    assert classify(wrapped) is Failure.COMMIT_UNKNOWN


def test_own_exceptions_carry_their_failure_and_share_the_root():
    cause = Pg2Error("read-only", "25006")
    errors = [
        ReadOnlyError("read-only maintenance"),
        DatabaseUnavailable("down", failure=Failure.COMMIT_UNKNOWN),
        DeadlineExceeded("gave up", failure=Failure.UNAVAILABLE, attempts=3, waited=1.5),
    ]
    for error in errors:
        assert isinstance(error, SrhtReadOnlyError)
        error.__cause__ = cause
    assert [classify(e) for e in errors] == [
        Failure.READ_ONLY, Failure.COMMIT_UNKNOWN, Failure.UNAVAILABLE,
    ]
    assert str(errors[0]) == "read-only maintenance"
    assert (errors[2].attempts, errors[2].waited) == (3, 1.5)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_own_exceptions_survive_pickling_with_every_field(protocol):
    errors = [
        ReadOnlyError("read-only maintenance"),
        ReadOnlyError("refused", failure=None),
        DatabaseUnavailable("down"),
        DatabaseUnavailable("lost in COMMIT", failure=Failure.COMMIT_UNKNOWN),
        DeadlineExceeded("gave up", failure=Failure.UNAVAILABLE, attempts=3, waited=1.5),
        DeadlineExceeded("gave up, no details"),  # every field has a default
    ]
    for error in errors:
        error.__cause__ = Pg2Error("read-only", "25006")  # not pickled: only what is in the error
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)
        assert classify(copy) is error.failure
        # Celery wraps what it cannot pickle in UnpickleableExceptionWrapper; ours go as they are.
        assert get_pickleable_exception(error) is error
    assert DeadlineExceeded("x").failure is None and DeadlineExceeded("x").attempts == 0


# --- real servers: every row of REFERENCE's table, for every driver -------------------------


class Driver:
    """A way to talk to PostgreSQL: raw psycopg2, raw psycopg 3, or SQLAlchemy 2 over either."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def connect(self, target: Any) -> Any:
        if self.name == "psycopg2":
            return psycopg2.connect(target.dsn, connect_timeout=5)
        if self.name == "psycopg":
            return psycopg.connect(target.dsn, connect_timeout=5, prepare_threshold=None)
        dialect = self.name.split("+", 1)[1]
        url = target.url.replace("postgresql://", f"postgresql+{dialect}://", 1)
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
        return engine.connect()

    def execute(self, conn: Any, statement: str) -> list[tuple]:
        if self.name.startswith("sqlalchemy"):
            result = conn.exec_driver_sql(statement)
            return [tuple(r) for r in result] if result.returns_rows else []
        cur = conn.cursor()
        cur.execute(statement)
        return cur.fetchall() if cur.description else []

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # already dead: that is what some tests do
            conn.close()


DRIVERS = [Driver(n) for n in ("psycopg2", "psycopg", "sqlalchemy+psycopg2", "sqlalchemy+psycopg")]


@pytest.fixture(scope="module")
def replicated_table(srht_lab):
    admin(srht_lab.primary.dsn, "CREATE TABLE IF NOT EXISTS classify_rows (v int)")
    wait_for(lambda: admin(srht_lab.standby.dsn, "SELECT to_regclass('classify_rows')")[0][0],
             "classify_rows on the standby")
    return srht_lab


#: What a read-only database answers, on real servers: (where, statement, what the message says).
READ_ONLY_REFUSALS = {
    "a write on a hot standby": ("standby", "INSERT INTO classify_rows VALUES (1)", "read-only transaction"),
    "a write with default_transaction_read_only": ("read-only database", "CREATE TABLE refused (v int)",
                                                   "read-only transaction"),
    "SET TRANSACTION READ WRITE on a standby": ("standby", "SET TRANSACTION READ WRITE", "during recovery"),
}


@pytest.mark.lab
@pytest.mark.parametrize("case", list(READ_ONLY_REFUSALS))
@pytest.mark.parametrize("driver", DRIVERS, ids=repr)
def test_read_only_refusals_are_read_only_with_every_driver(replicated_table, srht_readonly_db, driver, case):
    where, statement, says = READ_ONLY_REFUSALS[case]
    conn = driver.connect(replicated_table.standby if where == "standby" else srht_readonly_db)
    try:
        exc = error_of(lambda: driver.execute(conn, statement))
        assert says in str(exc)
        assert classify(exc) is Failure.READ_ONLY
    finally:
        driver.close(conn)


@pytest.mark.lab
@pytest.mark.parametrize("driver", DRIVERS, ids=repr)
def test_terminated_backend_is_unavailable(srht_lab, driver):
    conn = driver.connect(srht_lab.primary)
    try:
        ((pid,),) = driver.execute(conn, "SELECT pg_backend_pid()")
        admin(srht_lab.primary.admin_dsn, f"SELECT pg_terminate_backend({pid})")
        exc = error_of(lambda: driver.execute(conn, "SELECT 1"))
        assert classify(exc) is Failure.UNAVAILABLE
    finally:
        driver.close(conn)


@pytest.mark.lab
@pytest.mark.parametrize("driver", DRIVERS, ids=repr)
def test_statement_timeout_and_syntax_error_are_none(srht_lab, driver):
    conn = driver.connect(srht_lab.primary)
    try:
        driver.execute(conn, "SET LOCAL statement_timeout = '50ms'")
        exc = error_of(lambda: driver.execute(conn, "SELECT pg_sleep(2)"))
        assert "statement timeout" in str(exc)
        assert classify(exc) is None
        conn.rollback()
        exc = error_of(lambda: driver.execute(conn, "SELEC 1"))
        assert "syntax error" in str(exc)
        assert classify(exc) is None
    finally:
        driver.close(conn)


@pytest.fixture(scope="module")
def slow_commit_table(srht_lab):
    """A table whose COMMIT blocks (a deferred trigger sleeps), to lose connections during it."""
    commit_trigger(srht_lab.primary.dsn, "slow_commit", "PERFORM pg_sleep(30);")
    return srht_lab


def terminate_during_commit(lab: Any, pid: int) -> threading.Thread:
    """Kill backend ``pid`` once it is blocked in COMMIT."""

    def run() -> None:
        wait_for(lambda: admin(lab.primary.admin_dsn, f"""
            SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'active'
            AND query ILIKE 'commit%'"""), "the COMMIT to block")
        admin(lab.primary.admin_dsn, f"SELECT pg_terminate_backend({pid})")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.lab
@pytest.mark.parametrize("driver", DRIVERS[:2], ids=repr)
def test_connection_lost_during_commit_is_commit_unknown_when_the_caller_says_so(
    slow_commit_table, driver
):
    conn = driver.connect(slow_commit_table.primary)
    try:
        ((pid,),) = driver.execute(conn, "SELECT pg_backend_pid()")
        driver.execute(conn, "INSERT INTO slow_commit VALUES (1)")
        killer = terminate_during_commit(slow_commit_table, pid)
        exc = error_of(conn.commit)
        killer.join()
        # The raw drivers cannot say where the connection was lost: the caller must.
        assert classify(exc) is Failure.UNAVAILABLE
        assert classify(exc, during_commit=True) is Failure.COMMIT_UNKNOWN
    finally:
        driver.close(conn)


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_connection_lost_during_commit_is_commit_unknown_with_instrumented_sqlalchemy(
    slow_commit_table, dialect
):
    url = slow_commit_table.primary.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine = sa.create_engine(url, poolclass=NullPool)
    instrument(engine, ReadOnlyMonitor(announce_file=None))
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.exec_driver_sql("INSERT INTO slow_commit VALUES (1)")
        killer = terminate_during_commit(slow_commit_table, pid)
        exc = error_of(conn.commit)
        killer.join()
    assert isinstance(exc, sa.exc.DBAPIError)
    assert classify(exc) is Failure.COMMIT_UNKNOWN
    # The next transaction on a healthy connection is not mistaken for a COMMIT.
    with engine.connect() as conn:
        other = error_of(lambda: conn.exec_driver_sql("SELEC 1"))
    assert classify(other) is None
    engine.dispose()


@pytest.mark.lab
def test_rows_that_need_the_primary_stopped(srht_fresh_lab):
    """Fast shutdown under open connections, connecting to the stopped server, and PgBouncer
    in front of it: UNAVAILABLE for every driver."""
    lab = srht_fresh_lab
    primary = lab.primary
    direct = {d.name: d.connect(primary) for d in DRIVERS}
    bounced = {d.name: d.connect(lab.pgbouncer) for d in DRIVERS}
    for d in DRIVERS:
        assert d.execute(direct[d.name], "SELECT 1") == [(1,)]
        assert d.execute(bounced[d.name], "SELECT 1") == [(1,)]
    # PgBouncer holds the first query after the stop for query_wait_timeout (30 s in the lab).
    admin(lab.pgbouncer.admin_dsn, "SET query_wait_timeout = 2")
    primary.stop(mode="fast")
    results: dict[str, dict[str, Any]] = {}
    for d in DRIVERS:
        row = results.setdefault(d.name, {})
        row["fast shutdown"] = error_of(lambda d=d: d.execute(direct[d.name], "SELECT 1"))
        row["connect to stopped"] = error_of(lambda d=d: d.connect(primary))
        row["pgbouncer, server stopped"] = error_of(
            lambda d=d: d.execute(d.connect(lab.pgbouncer), "SELECT 1"))
        row["pgbouncer, open client"] = error_of(lambda d=d: d.execute(bounced[d.name], "SELECT 1"))
    seen = {(d, situation): (classify(exc), str(exc).splitlines()[0][:90])
            for d, row in results.items() for situation, exc in row.items()}
    wrong = {key: value for key, value in seen.items() if value[0] is not Failure.UNAVAILABLE}
    assert not wrong, wrong
    for d in DRIVERS:
        d.close(direct[d.name])
        d.close(bounced[d.name])


@pytest.mark.lab
def test_recovery_conflict_on_standby_is_none(srht_fresh_lab):
    lab = srht_fresh_lab
    standby = lab.standby
    admin(standby.admin_dsn, "ALTER SYSTEM SET max_standby_streaming_delay = '100ms'")
    admin(standby.admin_dsn, "SELECT pg_reload_conf()")
    admin(lab.primary.dsn, "CREATE TABLE conflict (v int); INSERT INTO conflict VALUES (1)")
    wait_for(lambda: admin(standby.dsn, "SELECT to_regclass('conflict')")[0][0], "replication")
    errors = {}
    for d in DRIVERS:
        conn = d.connect(standby)
        dropper = threading.Timer(0.5, admin, (lab.primary.dsn, "DROP TABLE conflict; "
                                                "CREATE TABLE conflict AS SELECT 1 AS v"))
        dropper.start()
        errors[d.name] = error_of(
            lambda d=d, conn=conn: d.execute(conn, "SELECT pg_sleep(20) FROM conflict"))
        dropper.join()
        d.close(conn)
        wait_for(lambda: admin(standby.dsn, "SELECT to_regclass('conflict') IS NOT NULL "
                                            "AND EXISTS (SELECT FROM conflict)")[0][0], "replication")
    for name, exc in errors.items():
        assert "conflict with recovery" in str(exc), (name, exc)
        assert classify(exc) is None, (name, exc)

"""instrument(engine, monitor): errors reach the monitor, stale connections are dropped."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from srht_readonly import Failure, ReadOnlyMonitor, classify, drop_on_read_only
from srht_readonly.ops.ports import free_port
from srht_readonly.sqlalchemy import (
    create_engine,
    instrument,
    is_instrumented,
    monitor_of,
    pgbouncer_safe_url,
)
from tests._db import admin, commit_trigger, error_of
from tests._fakes import dispose_engines

# The server raises these itself while the connection stays open: only our table calls them a
# failover failure, so they show what the hook adds to SQLAlchemy's own disconnect detection.
FAKE_SHUTDOWN = "DO $$ BEGIN RAISE EXCEPTION 'fake' USING ERRCODE = 'admin_shutdown'; END $$"


@pytest.fixture(autouse=True)
def _dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Any:
    yield from dispose_engines(monkeypatch)


def pids(engine: sa.Engine, n: int) -> set[int]:
    """Backend pids of ``n`` connections checked out at the same time."""
    conns = [engine.connect() for _ in range(n)]
    try:
        return {c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() for c in conns}
    finally:
        for c in conns:
            c.close()


def kill_in_commit(lab: Any, pid: int) -> threading.Thread:
    """Terminate backend ``pid`` once it is blocked in COMMIT (a deferred trigger sleeps)."""

    def run() -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end and not admin(lab.primary.admin_dsn, f"""
                SELECT 1 FROM pg_stat_activity WHERE pid = {pid} AND state = 'active'
                AND query ILIKE 'commit%'"""):
            time.sleep(0.02)
        admin(lab.primary.admin_dsn, f"SELECT pg_terminate_backend({pid})")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_instrument_once_per_engine_and_gives_the_monitor_the_engine():
    engine = sa.create_engine("postgresql://srht@127.0.0.1:1/srht")
    monitor = ReadOnlyMonitor(announce_file=None)
    assert not is_instrumented(engine)
    assert instrument(engine, monitor) is engine
    assert instrument(engine, monitor) is engine  # again: nothing more
    assert is_instrumented(engine) and monitor.engine is engine
    with pytest.raises(ValueError):
        instrument(engine, ReadOnlyMonitor(announce_file=None))
    other = sa.create_engine("postgresql://srht@127.0.0.1:2/srht")
    instrument(other, monitor)
    assert monitor.engine is engine  # the first engine stays the one probed


def test_connect_errors_reach_the_monitor():
    asked = []

    def probe() -> bool:
        asked.append(1)
        raise psycopg2.OperationalError("connection refused")

    engine = sa.create_engine(f"postgresql://srht@127.0.0.1:{free_port()}/srht")
    monitor = ReadOnlyMonitor(probe=probe, announce_file=None)
    instrument(engine, monitor)
    with pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    assert classify(info.value) is Failure.UNAVAILABLE
    assert monitor.read_only is True and asked == [1]
    assert monitor.state.reason == "probe"


@pytest.mark.lab
def test_orm_flush_refusal_reaches_the_monitor(srht_readonly_db):
    engine = sa.create_engine(srht_readonly_db.url)
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    with Session(engine) as session, pytest.raises(sa.exc.InternalError):
        session.execute(sa.text("CREATE TABLE refused (v int)"))
    assert monitor.state.read_only and monitor.state.reason == "error"
    assert "read-only transaction" in monitor.state.detail
    engine.dispose()


@pytest.mark.lab
@pytest.mark.parametrize("instrumented", [True, False])
def test_unavailable_error_invalidates_the_connection_and_recycles_the_pool(srht_lab, instrumented):
    engine = sa.create_engine(srht_lab.primary.url, pool_size=3, max_overflow=0)
    if instrumented:
        instrument(engine, ReadOnlyMonitor(announce_file=None))
    before = pids(engine, 3)
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as info:
        conn.exec_driver_sql(FAKE_SHUTDOWN)
    assert classify(info.value) is Failure.UNAVAILABLE
    after = pids(engine, 3)
    if instrumented:
        assert info.value.connection_invalidated
        assert not before & after  # every connection older than the failure was replaced
    else:
        assert not info.value.connection_invalidated
        assert before == after  # SQLAlchemy alone keeps them
    engine.dispose()


@pytest.mark.lab
def test_read_only_refusal_keeps_the_transaction_and_recycles_that_connection(srht_readonly_db):
    engine = sa.create_engine(srht_readonly_db.url, pool_size=2, max_overflow=0)
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    with engine.connect() as other:
        other_pid = other.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with drop_on_read_only(conn):
            conn.exec_driver_sql("CREATE TABLE refused (v int)")
        # Same connection, same transaction, still reading after the refusal.
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == pid
        assert conn.in_transaction()
    assert monitor.state.read_only
    assert pid not in pids(engine, 2)  # replaced at its next checkout ...
    engine.dispose()
    # ... while a connection that never met the refusal is not penalised.
    engine = sa.create_engine(srht_readonly_db.url, pool_size=2, max_overflow=0)
    instrument(engine, monitor)
    with engine.connect() as conn:
        other_pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() == other_pid
    engine.dispose()


@pytest.mark.lab
def test_a_successful_commit_does_not_make_later_failures_look_like_commits(srht_lab):
    engine = sa.create_engine(srht_lab.primary.url, pool_size=1, max_overflow=0)
    instrument(engine, ReadOnlyMonitor(announce_file=None))
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        conn.commit()
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg2.connect(srht_lab.primary.admin_dsn) as admin:
            admin.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(sa.exc.OperationalError) as info:
            conn.exec_driver_sql("SELECT 1")
    assert classify(info.value) is Failure.UNAVAILABLE
    engine.dispose()


@pytest.mark.lab
def test_instrumented_engine_adds_no_statement_through_pgbouncer(srht_lab):
    url = srht_lab.pgbouncer.url.replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(url, connect_args={"prepare_threshold": None})
    statements: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    for i in range(20):
        with engine.begin() as conn:
            assert conn.exec_driver_sql(f"SELECT {i}").scalar_one() == i
        assert monitor.check() is False
    assert statements == [f"SELECT {i}" for i in range(20)]
    engine.dispose()


def test_instrument_adds_no_per_statement_or_per_transaction_hook():
    engine = sa.create_engine("postgresql://srht@127.0.0.1:1/srht")
    instrument(engine, ReadOnlyMonitor(announce_file=None))
    # No connection event at all, so SQLAlchemy skips every dispatch of a healthy transaction;
    # only handle_error (which runs on failures) is listened to.
    assert not engine._has_events
    for name in ("begin", "commit", "rollback", "before_execute", "before_cursor_execute",
                 "after_cursor_execute", "engine_connect"):
        assert not getattr(engine.dispatch, name), name
    assert len(engine.dialect.dispatch.handle_error) == 1


def test_monitor_of_gives_the_engines_monitor_also_for_its_copies():
    engine = sa.create_engine("postgresql://srht@127.0.0.1:1/srht")
    assert monitor_of(engine) is None
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    assert monitor_of(engine) is monitor
    copy = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert monitor_of(copy) is monitor and is_instrumented(copy)
    with pytest.raises(ValueError):
        instrument(copy, ReadOnlyMonitor(announce_file=None))  # same dialect, same hook


@pytest.fixture(scope="module")
def commit_tables(srht_lab):
    """``sa_slow``: COMMIT blocks 30 s; ``sa_refused``: COMMIT is refused with 25006, as by a
    read-only database (both through deferred constraint triggers)."""
    commit_trigger(srht_lab.primary.dsn, "sa_slow", "PERFORM pg_sleep(30);")
    commit_trigger(srht_lab.primary.dsn, "sa_refused", "RAISE EXCEPTION 'cannot execute INSERT in a read-only "
                   "transaction' USING ERRCODE = 'read_only_sql_transaction';")
    return srht_lab


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_connection_lost_in_an_orm_commit_is_commit_unknown_and_recycles_the_pool(commit_tables, dialect):
    url = commit_tables.primary.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine = sa.create_engine(url, pool_size=3, max_overflow=0)
    asked: list[int] = []
    monitor = ReadOnlyMonitor(probe=lambda: bool(asked.append(1)), announce_file=None)
    instrument(engine, monitor)
    before = pids(engine, 3)
    with Session(engine) as session:
        pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        session.execute(sa.text("INSERT INTO sa_slow VALUES (1)"))
        killer = kill_in_commit(commit_tables, pid)
        exc = error_of(session.commit)
        killer.join()
    assert isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated
    assert classify(exc) is Failure.COMMIT_UNKNOWN
    assert monitor.read_only is False and asked == [1]  # observed: the next read probed once
    assert not before & pids(engine, 3)  # no connection older than the failure is handed out
    # A healthy commit afterwards is no COMMIT failure, and a later lost connection is no COMMIT.
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
    with engine.connect() as conn:
        other = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        admin(commit_tables.primary.admin_dsn, f"SELECT pg_terminate_backend({other})")
        lost = error_of(lambda: conn.exec_driver_sql("SELECT 1"))
    assert classify(lost) is Failure.UNAVAILABLE
    engine.dispose()


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_read_only_refusal_at_commit_reaches_the_monitor_and_recycles_that_connection(commit_tables, dialect):
    url = commit_tables.primary.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    monitor = ReadOnlyMonitor(probe=lambda: False, announce_file=None)
    instrument(engine, monitor)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        conn.exec_driver_sql("INSERT INTO sa_refused VALUES (1)")
        exc = error_of(conn.commit)
    # The server said no at COMMIT: nothing was saved, so it stays READ_ONLY, not unknown.
    assert classify(exc) is Failure.READ_ONLY
    assert monitor.state.read_only and monitor.state.reason == "error"
    assert pid not in pids(engine, 1)
    engine.dispose()


def test_pgbouncer_safe_url_picks_psycopg2_for_a_bare_url():
    for bare in ("postgresql://srht@db/git.sr.ht", "postgres://srht@db/git.sr.ht"):
        assert pgbouncer_safe_url(bare).drivername == "postgresql+psycopg2"
    for explicit in ("postgresql+psycopg://srht@db/x", "postgresql+psycopg2://srht@db/x", "sqlite://"):
        assert pgbouncer_safe_url(explicit) == sa.make_url(explicit)
    assert pgbouncer_safe_url("postgresql://u:p%40ss@db:6432/x?sslmode=disable").render_as_string(
        hide_password=False) == "postgresql+psycopg2://u:p%40ss@db:6432/x?sslmode=disable"


def prepared(engine: sa.Engine, marker: str) -> int:
    """Run one statement ten times in a transaction through PgBouncer (one server connection)
    and count the server-side prepared statements it left on that connection."""
    with engine.begin() as conn:
        for _ in range(10):
            conn.execute(sa.text(f"SELECT '{marker}' || :n"), {"n": "x"})
        return conn.execute(
            sa.text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE :m"),
            {"m": f"%{marker}%"},
        ).scalar_one()


@pytest.mark.lab
def test_create_engine_never_prepares_behind_pgbouncer(srht_lab):
    url = srht_lab.pgbouncer.url
    monitor = ReadOnlyMonitor(announce_file=None)
    bare = create_engine(url, monitor=monitor)
    assert bare.dialect.driver == "psycopg2" and monitor_of(bare) is monitor
    psycopg3 = create_engine(url.replace("postgresql://", "postgresql+psycopg://"),
                             connect_args={"connect_timeout": 5})
    with psycopg3.connect() as conn:
        assert conn.connection.driver_connection.prepare_threshold is None
    # The hazard is real: psycopg 3 left alone prepares on the PgBouncer server connection.
    plain = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    assert prepared(plain, f"plain-{uuid.uuid4()}") >= 1
    plain.dispose()
    for engine in (bare, psycopg3):
        assert prepared(engine, f"safe-{uuid.uuid4()}") == 0
        engine.dispose()

"""instrument(engine, monitor): errors reach the monitor, stale connections are dropped."""

from __future__ import annotations

import socket
from typing import Any

import psycopg2
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from srht_readonly import Failure, ReadOnlyMonitor, classify, drop_on_read_only
from srht_readonly.sqlalchemy import instrument, is_instrumented

# The server raises these itself while the connection stays open: only our table calls them a
# failover failure, so they show what the hook adds to SQLAlchemy's own disconnect detection.
FAKE_SHUTDOWN = "DO $$ BEGIN RAISE EXCEPTION 'fake' USING ERRCODE = 'admin_shutdown'; END $$"


@pytest.fixture(autouse=True)
def _dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Dispose every engine a test made, even when it fails: a connection left to the garbage
    collector is a ResourceWarning, and warnings are errors."""
    made: list[sa.Engine] = []
    real = sa.create_engine

    def create_engine(*args: Any, **kwargs: Any) -> sa.Engine:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sa, "create_engine", create_engine)
    yield
    for engine in made:
        engine.dispose()


def pids(engine: sa.Engine, n: int) -> set[int]:
    """Backend pids of ``n`` connections checked out at the same time."""
    conns = [engine.connect() for _ in range(n)]
    try:
        return {c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() for c in conns}
    finally:
        for c in conns:
            c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

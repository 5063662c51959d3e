"""abort / drop / retry: logic with fakes and a fake clock, then behaviour on the lab's servers."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from srht_readonly import (
    DatabaseUnavailable,
    Deadline,
    DeadlineExceeded,
    Failure,
    ReadOnlyError,
    ReadOnlyMonitor,
    abort_on_read_only,
    classify,
    drop_on_read_only,
    retry_until_writable,
)
from srht_readonly.sqlalchemy import instrument
from tests._db import admin, commit_trigger, wait_for
from tests._fakes import FakeTime, Pg2Error, RecordingSession, dispose_engines, lost_connection_error, read_only_error

read_only = read_only_error
lost = lost_connection_error
FakeSession = RecordingSession


@pytest.fixture(autouse=True)
def _dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Any:
    yield from dispose_engines(monkeypatch)


def failing(*errors: Exception, result: Any = "done") -> Any:
    """A function raising ``errors`` one per call, then returning ``result``."""
    pending = list(errors)
    calls = []

    def fn() -> Any:
        calls.append(1)
        if pending:
            raise pending.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


# --- abort ---------------------------------------------------------------------------------------


def test_abort_turns_read_only_failure_into_read_only_error_with_cause():
    error = read_only()
    with pytest.raises(ReadOnlyError) as info, abort_on_read_only("git.sr.ht is read-only"):
        raise error
    assert str(info.value) == "git.sr.ht is read-only"
    assert info.value.__cause__ is error
    assert info.value.failure is Failure.READ_ONLY


def test_abort_turns_lost_connection_into_database_unavailable_and_passes_others():
    error = lost()
    with pytest.raises(DatabaseUnavailable) as info, abort_on_read_only("try later"):
        raise error
    assert info.value.__cause__ is error and info.value.failure is Failure.UNAVAILABLE
    with pytest.raises(KeyError), abort_on_read_only("try later"):
        raise KeyError("not ours")
    syntax = Pg2Error("syntax error", "42601")
    with pytest.raises(Pg2Error) as raw, abort_on_read_only("try later"):
        raise syntax
    assert raw.value is syntax


def test_abort_as_decorator_and_with_a_monitor_that_already_knows():
    monitor = ReadOnlyMonitor(announce_file=None)
    ran = []

    @abort_on_read_only("no repository creation during maintenance", monitor=monitor)
    def create_repo() -> str:
        ran.append(1)
        raise read_only()

    with pytest.raises(ReadOnlyError):
        create_repo()
    assert monitor.state.read_only  # the failure was observed
    with pytest.raises(ReadOnlyError):
        create_repo()
    assert ran == [1]  # the second call never ran: the monitor knew


def test_abort_before_running_says_unavailable_when_the_database_is_unreachable():
    def unreachable() -> bool:
        raise lost()

    monitor = ReadOnlyMonitor(probe=unreachable, announce_file=None)
    monitor.observe(lost())  # the next read probes, and the probe fails
    with pytest.raises(DatabaseUnavailable) as info, abort_on_read_only("later", monitor=monitor):
        pytest.fail("the body must not run")
    assert info.value.failure is Failure.UNAVAILABLE


# --- retry, with a fake clock --------------------------------------------------------------------


def test_retry_waits_grow_exponentially_and_are_capped():
    fake = FakeTime()
    fn = failing(*[read_only() for _ in range(7)])
    policy = retry_until_writable(Deadline(60, clock=fake.clock), jitter=None, sleep=fake.sleep)
    assert policy.call(fn) == "done"
    assert fake.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert len(fn.calls) == 8


def test_retry_full_jitter_keeps_each_wait_under_the_exponential_bound():
    fake = FakeTime()
    fn = failing(*[lost() for _ in range(30)])
    retry_until_writable(Deadline(600, clock=fake.clock), sleep=fake.sleep).call(fn)
    bounds = [min(0.1 * 2**i, 1.0) for i in range(30)]
    assert all(0 <= s <= b for s, b in zip(fake.sleeps, bounds, strict=True))
    assert len(set(fake.sleeps)) > 20


def test_retry_raises_deadline_exceeded_exactly_at_the_deadline():
    fake = FakeTime()
    errors = [read_only() for _ in range(1000)]
    fn = failing(*errors)
    with pytest.raises(DeadlineExceeded) as info:
        retry_until_writable(Deadline(3, clock=fake.clock), sleep=fake.sleep).call(fn)
    assert fake.now == pytest.approx(3.0)  # every wait capped at the time left
    assert info.value.failure is Failure.READ_ONLY
    assert info.value.attempts == len(fn.calls) > 3
    assert info.value.waited == pytest.approx(3.0)
    assert info.value.__cause__ is errors[len(fn.calls) - 1]
    assert classify(info.value) is Failure.READ_ONLY


def test_a_shared_deadline_is_spent_across_calls():
    fake = FakeTime()
    deadline = Deadline(3, clock=fake.clock)
    policy = retry_until_writable(deadline, jitter=None, sleep=fake.sleep)
    fake.now = 2.0  # the first writes of the build took two seconds
    assert policy.call(failing(read_only(), read_only())) == "done"
    with pytest.raises(DeadlineExceeded):
        policy.call(failing(*[read_only() for _ in range(100)]))
    assert fake.now == pytest.approx(3.0)


def test_an_expired_deadline_still_allows_one_try():
    fake = FakeTime()
    deadline = Deadline(1, clock=fake.clock)
    fake.now = 5.0
    assert retry_until_writable(deadline, sleep=fake.sleep).call(failing()) == "done"
    with pytest.raises(DeadlineExceeded):
        retry_until_writable(deadline, sleep=fake.sleep).call(failing(read_only()))
    assert fake.sleeps == []


def test_retry_never_repeats_an_unknown_commit_unless_idempotent():
    fake = FakeTime()
    unknown = Pg2Error("transaction resolution unknown", "08007")
    fn = failing(unknown)
    with pytest.raises(DatabaseUnavailable) as info:
        retry_until_writable(Deadline(60, clock=fake.clock), sleep=fake.sleep).call(fn)
    assert info.value.failure is Failure.COMMIT_UNKNOWN and info.value.__cause__ is unknown
    assert len(fn.calls) == 1
    fn = failing(Pg2Error("transaction resolution unknown", "08007"))
    policy = retry_until_writable(Deadline(60, clock=fake.clock), idempotent=True, sleep=fake.sleep)
    assert policy.call(fn) == "done" and len(fn.calls) == 2


def test_retry_lets_other_errors_through_at_once():
    syntax = Pg2Error("syntax error", "42601")
    fn = failing(syntax)
    with pytest.raises(Pg2Error) as info:
        retry_until_writable(60).call(fn)
    assert info.value is syntax and len(fn.calls) == 1


def test_retry_rolls_back_before_every_try_and_commits_as_part_of_it():
    fake = FakeTime()
    session = FakeSession(commit_errors=[read_only()])
    fn = failing(lost())
    policy = retry_until_writable(Deadline(60, clock=fake.clock), session=session, sleep=fake.sleep)
    assert policy.call(fn) == "done"
    # try 1: body lost; try 2: body ok, commit refused; try 3: ok.
    assert session.log == [
        "rollback", "rollback",
        "rollback", "flush", "commit", "rollback",
        "rollback", "flush", "commit",
    ]


def test_connection_lost_in_the_policys_commit_is_commit_unknown():
    fake = FakeTime()
    session = FakeSession(commit_errors=[lost()])
    with pytest.raises(DatabaseUnavailable) as info:
        retry_until_writable(Deadline(60, clock=fake.clock), session=session,
                             sleep=fake.sleep).call(failing())
    assert info.value.failure is Failure.COMMIT_UNKNOWN
    assert session.log.count("commit") == 1


def test_retry_as_loop_of_attempts_decorator_and_on_wait_events():
    fake = FakeTime()
    events = []
    monitor = ReadOnlyMonitor(announce_file=None)
    policy = retry_until_writable(Deadline(60, clock=fake.clock), monitor=monitor,
                                  on_wait=events.append, sleep=fake.sleep)
    errors = [read_only(), lost()]
    tries = 0
    for attempt in policy:
        with attempt:
            tries += 1
            if errors:
                raise errors.pop(0)
    assert tries == 3
    assert [(e["attempt"], e["failure"]) for e in events] == [
        (1, Failure.READ_ONLY), (2, Failure.UNAVAILABLE)]
    assert monitor.state.read_only  # every failure reached the monitor

    calls = []

    @retry_until_writable(60, sleep=fake.sleep)
    def set_status(status: str) -> str:
        calls.append(status)
        if len(calls) < 2:
            raise read_only()
        return status

    assert set_status("running") == "running" and calls == ["running", "running"]
    assert set_status.__name__ == "set_status"

    with pytest.raises(RuntimeError, match="with attempt"):
        for _attempt in retry_until_writable(60):
            pass


def test_retry_logs_once_per_state_change_not_once_per_try(caplog):
    fake = FakeTime()
    caplog.set_level(logging.DEBUG, logger="srht_readonly.policies.retry")
    policy = retry_until_writable(Deadline(60, clock=fake.clock), sleep=fake.sleep)
    policy.call(failing(read_only()))  # whatever an earlier test left: the process saw a success
    caplog.clear()

    policy.call(failing(*[read_only() for _ in range(6)], *[lost() for _ in range(4)]))
    waits = [r for r in caplog.records if "retrying the write" in r.getMessage()]
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(waits) == 10  # every wait is logged, ...
    assert len(info) == 3  # ... at INFO only when the state changed:
    assert info[0].startswith("database read_only; retrying the write")
    assert info[1].startswith("database unavailable; retrying the write")
    assert info[2].startswith("database writable again: the write went through (attempt 11")
    assert all(r.name == "srht_readonly.policies.retry" for r in caplog.records)

    # Eight writes blocked on the same read-only database (threads of one worker, say) say
    # so once between them, not once each.
    caplog.clear()
    for _ in range(8):
        with pytest.raises(DeadlineExceeded):
            retry_until_writable(Deadline(2, clock=fake.clock), sleep=fake.sleep).call(
                failing(*[read_only() for _ in range(100)]))
    assert [r.levelno for r in caplog.records].count(logging.INFO) == 1
    policy.call(failing())  # writable again, said once
    assert [r.getMessage() for r in caplog.records][-1].startswith("database writable again")
    policy.call(failing())
    assert [r.levelno for r in caplog.records].count(logging.INFO) == 2


def test_retry_log_can_be_sent_elsewhere_or_silenced(caplog):
    fake = FakeTime()
    caplog.set_level(logging.DEBUG)
    build_log = logging.LoggerAdapter(logging.getLogger(f"test.build.{uuid.uuid4().hex}"), {})
    retry_until_writable(Deadline(60, clock=fake.clock), log=build_log, sleep=fake.sleep).call(
        failing(read_only(), read_only()))
    assert {r.name for r in caplog.records} == {build_log.logger.name}
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.DEBUG, logging.INFO]

    caplog.clear()
    events: list[Any] = []
    retry_until_writable(Deadline(60, clock=fake.clock), log=None, on_wait=events.append,
                         sleep=fake.sleep).call(failing(read_only(), lost()))
    assert caplog.records == []  # silent: the caller's on_wait says what it wants
    assert [e["failure"] for e in events] == [Failure.READ_ONLY, Failure.UNAVAILABLE]


# --- real servers ----------------------------------------------------------------------------


@pytest.fixture
def readonly_table(srht_readonly_db):
    admin(srht_readonly_db.dsn, "BEGIN READ WRITE; CREATE TABLE notes (v text); "
                                "INSERT INTO notes VALUES ('kept'); COMMIT")
    return srht_readonly_db


@pytest.fixture(scope="module")
def standby_table(srht_lab):
    admin(srht_lab.primary.dsn, "CREATE TABLE IF NOT EXISTS policy_notes (v text)")
    wait_for(lambda: admin(srht_lab.standby.dsn, "SELECT to_regclass('policy_notes')")[0][0],
             "policy_notes on the standby")
    return srht_lab


def unique_warning() -> str:
    return f"remote: webhooks not delivered, the database is read-only ({uuid.uuid4().hex[:8]})"


@pytest.mark.lab
def test_drop_keeps_the_session_transaction_readable_and_warns_once(readonly_table, capfd):
    engine = sa.create_engine(readonly_table.url)
    warning = unique_warning()
    with Session(engine) as session:
        assert session.execute(sa.text("SELECT count(*) FROM notes")).scalar_one() == 1
        for _ in range(3):
            with drop_on_read_only(session, warn=warning) as drop:
                session.execute(sa.text("INSERT INTO notes VALUES ('dropped')"))
            assert drop.dropped
            assert session.execute(sa.text("SELECT v FROM notes")).scalars().all() == ["kept"]
        assert session.in_transaction()  # the same transaction all along
    out, err = capfd.readouterr()
    assert err.count(warning) == 1 and warning not in out
    engine.dispose()


class RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())
        super().flush()


@pytest.mark.lab
def test_drop_warning_goes_to_the_current_stderr_flushed_without_print(readonly_table, monkeypatch):
    stream = RecordingStream()
    monkeypatch.setattr(sys, "stderr", stream)  # replaced after import, as SSH hooks and tests do

    def no_print(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("print() used")

    monkeypatch.setattr("builtins.print", no_print)
    engine = sa.create_engine(readonly_table.url)
    warning = unique_warning()
    with Session(engine) as session:
        for _ in range(2):
            with drop_on_read_only(session, warn=warning) as drop:
                session.execute(sa.text("INSERT INTO notes VALUES ('dropped')"))
            assert drop.dropped
    assert stream.getvalue() == warning + "\n"
    assert stream.flushed == [warning + "\n"]  # flushed at once: the pusher sees it before git ends
    engine.dispose()


@pytest.mark.lab
def test_drop_on_hot_standby_with_a_connection_is_silent_without_warn(standby_table, capfd):
    engine = sa.create_engine(standby_table.standby.url)
    with engine.connect() as conn:
        before = conn.exec_driver_sql("SELECT count(*) FROM policy_notes").scalar_one()
        with drop_on_read_only(conn):
            conn.exec_driver_sql("INSERT INTO policy_notes VALUES ('mtime')")
        assert conn.exec_driver_sql("SELECT count(*) FROM policy_notes").scalar_one() == before
    assert capfd.readouterr() == ("", "")
    engine.dispose()


@pytest.mark.lab
def test_drop_with_an_instrumented_engine_keeps_the_transaction(readonly_table):
    engine = sa.create_engine(readonly_table.url)
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)

    @drop_on_read_only(engine_session := Session(engine), monitor=monitor)
    def touch() -> str:
        engine_session.execute(sa.text("INSERT INTO notes VALUES ('dropped')"))
        return "written"

    with engine_session:
        pid = engine_session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert touch() is None  # dropped
        assert engine_session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() == pid
        assert engine_session.execute(sa.text("SELECT count(*) FROM notes")).scalar_one() == 1
    assert monitor.state.read_only
    engine.dispose()


@pytest.mark.lab
def test_drop_passes_other_errors_and_keeps_successful_writes(standby_table):
    engine = sa.create_engine(standby_table.primary.url)
    marker = uuid.uuid4().hex
    with Session(engine) as session:
        with pytest.raises(sa.exc.ProgrammingError), drop_on_read_only(session):
            session.execute(sa.text("INSERT INTO no_such_table VALUES (1)"))
        with drop_on_read_only(session) as drop:  # the transaction survived the failure
            session.execute(sa.text("INSERT INTO policy_notes VALUES (:m)"), {"m": marker})
        assert not drop.dropped
        session.commit()
    assert admin(standby_table.primary.dsn, f"SELECT count(*) FROM policy_notes WHERE v = '{marker}'") == [(1,)]
    engine.dispose()


@pytest.mark.lab
def test_retry_gives_up_between_three_and_four_seconds_on_a_standby(standby_table):
    engine = sa.create_engine(standby_table.standby.url)
    with Session(engine) as session:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as info:
            for attempt in retry_until_writable(3, session=session):
                with attempt:
                    session.execute(sa.text("INSERT INTO policy_notes VALUES ('blocked')"))
        elapsed = time.monotonic() - started
    print(f"\nDeadlineExceeded after {elapsed:.2f} s, {info.value.attempts} attempts (deadline 3 s)")
    assert 3.0 <= elapsed <= 4.0
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)
    engine.dispose()


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_write_blocked_on_standby_succeeds_within_two_seconds_of_promotion(srht_fresh_lab, dialect):
    lab = srht_fresh_lab
    old_primary, standby = lab.primary, lab.standby
    admin(old_primary.dsn, "CREATE TABLE builds (status text)")
    wait_for(lambda: admin(standby.dsn, "SELECT to_regclass('builds')")[0][0], "replication")
    lab.pgbouncer.point_at(standby)  # the plan's read-only failover
    url = lab.pgbouncer.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine = sa.create_engine(url, connect_args={"prepare_threshold": None} if dialect == "psycopg" else {})
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    promoted: list[float] = []

    def promote() -> None:
        old_primary.stop(mode="fast")
        lab.promote(standby)
        promoted.append(time.monotonic())

    promoter = threading.Timer(1.5, promote)
    waits = []
    with Session(engine) as session:
        promoter.start()

        @retry_until_writable(30, session=session, monitor=monitor, on_wait=waits.append)
        def set_status() -> None:
            session.execute(sa.text("INSERT INTO builds VALUES ('running')"))

        set_status()
        done = time.monotonic()
    promoter.join()
    delay = done - promoted[0]
    print(f"\n{dialect}: write succeeded {delay:.2f} s after promotion, {len(waits) + 1} attempts")
    assert delay <= 2.0
    assert len(waits) >= 3 and waits[0]["failure"] is Failure.READ_ONLY
    assert admin(standby.dsn, "SELECT count(*) FROM builds") == [(1,)]
    engine.dispose()


@pytest.fixture(scope="module")
def slow_commit(srht_lab):
    """COMMIT blocks while ``app.slow`` is on (a deferred trigger sleeps), so it can be killed."""
    commit_trigger(srht_lab.primary.dsn, "policy_slow",
                   "IF current_setting('app.slow', true) = 'on' THEN PERFORM pg_sleep(30); END IF;")
    return srht_lab


def kill_when_committing(lab: Any, session: Session) -> threading.Thread:
    pid = session.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()

    def run() -> None:
        wait_for(lambda: admin(lab.primary.admin_dsn, f"SELECT 1 FROM pg_stat_activity WHERE "
                               f"pid = {pid} AND state = 'active' AND query ILIKE 'commit%'"),
                 "the COMMIT to block")
        admin(lab.primary.admin_dsn, f"SELECT pg_terminate_backend({pid})")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.lab
@pytest.mark.parametrize("idempotent", [False, True])
def test_retry_does_not_repeat_a_commit_lost_on_the_wire_unless_idempotent(slow_commit, idempotent):
    engine = sa.create_engine(slow_commit.primary.url)  # not instrumented: the policy knows
    attempts = []
    killers = []
    with Session(engine) as session:

        @retry_until_writable(10, session=session, idempotent=idempotent)
        def write() -> None:
            attempts.append(1)
            if len(attempts) == 1:
                session.execute(sa.text("SET LOCAL app.slow = 'on'"))
                killers.append(kill_when_committing(slow_commit, session))
            session.execute(sa.text("INSERT INTO policy_slow VALUES (1)"))

        if idempotent:
            write()
            assert len(attempts) == 2
        else:
            with pytest.raises(DatabaseUnavailable) as info:
                write()
            assert info.value.failure is Failure.COMMIT_UNKNOWN
            assert isinstance(info.value.__cause__, sa.exc.OperationalError)
            assert len(attempts) == 1
    for killer in killers:
        killer.join()
    engine.dispose()

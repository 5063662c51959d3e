"""ReadOnlyMonitor: state logic with a fake clock, then the promises on the lab's real servers."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from srht_readonly import Failure, ReadOnlyMonitor, classify
from srht_readonly.sqlalchemy import instrument
from tests._fakes import Clock, Pg2Error, Probe, dispose_engines, lost_connection_error, monitor_on, read_only_error

READ_ONLY = read_only_error()
LOST = lost_connection_error()
make = monitor_on


@pytest.fixture(autouse=True)
def _dispose_engines(monkeypatch: pytest.MonkeyPatch) -> Any:
    yield from dispose_engines(monkeypatch)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_reads_while_writable_never_probe(clock):
    probe = Probe(clock)
    monitor = make(clock, probe)
    for _ in range(10_000):
        assert monitor.read_only is False
        clock.advance(0.01)
    assert probe.calls == []


def test_read_only_failure_flips_at_once_and_is_logged_and_told_once(clock, caplog):
    monitor = make(clock, Probe(clock, answer=True))
    events = []
    monitor.add_listener(events.append)
    caplog.set_level(logging.INFO, logger="srht_readonly")
    for _ in range(100):
        assert monitor.observe(READ_ONLY) is Failure.READ_ONLY
        assert monitor.read_only is True
    assert [e["event"] for e in events] == ["read-only"]
    assert events[0]["reason"] == "error" and events[0]["failure"] is Failure.READ_ONLY
    assert "read-only transaction" in events[0]["detail"]
    assert len([r for r in caplog.records if "read-only" in r.getMessage()]) == 1
    assert monitor.state.reason == "error"


def test_read_only_reprobes_at_most_once_per_recheck_interval_with_jitter(clock):
    random.seed(3)
    probe = Probe(clock, answer=True)
    monitor = make(clock, probe, recheck=2.0, jitter=0.25)
    monitor.observe(READ_ONLY)
    flipped = clock.now
    for _ in range(3000):
        assert monitor.read_only is True
        clock.advance(0.01)
    times = [flipped, *probe.calls]
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) >= 14
    assert all(1.5 - 0.011 <= gap <= 2.0 + 0.011 for gap in gaps), gaps
    assert len(set(gaps)) > 3  # jitter: processes do not probe in lockstep


def test_turns_writable_by_itself_when_a_probe_says_so(clock):
    probe = Probe(clock, answer=True)
    monitor = make(clock, probe, recheck=1.0)
    events = []
    monitor.add_listener(events.append)
    monitor.observe(READ_ONLY)
    clock.advance(1.0)
    assert monitor.read_only is True
    probe.answer = False
    clock.advance(1.0)
    assert monitor.read_only is False
    assert monitor.state.reason == "probe"
    assert [e["event"] for e in events] == ["read-only", "writable"]
    calls = len(probe.calls)
    for _ in range(1000):
        monitor.read_only  # noqa: B018 - the read is the behaviour under test
        clock.advance(0.1)
    assert len(probe.calls) == calls


def test_lost_connection_makes_the_next_read_probe_once(clock):
    probe = Probe(clock, answer=False)
    monitor = make(clock, probe)
    assert monitor.observe(LOST) is Failure.UNAVAILABLE
    assert monitor.read_only is False
    assert monitor.read_only is False
    assert len(probe.calls) == 1
    probe.answer = Pg2Error('connection to server at "127.0.0.1" failed: Connection refused')
    monitor.observe(LOST)
    assert monitor.read_only is True
    assert monitor.state.reason == "probe"
    assert monitor.state.detail.startswith("database unreachable")
    assert monitor.state.failure is Failure.UNAVAILABLE


def test_a_probe_that_fails_for_a_reason_other_than_the_database_means_unavailable_not_read_only(clock):
    # A pool checkout timing out, say: nothing says the database refuses writes.
    probe = Probe(clock, answer=TimeoutError("QueuePool limit of size 5 overflow 10 reached"))
    monitor = make(clock, probe)
    monitor.observe(LOST)
    assert monitor.read_only is True
    assert monitor.state.failure is Failure.UNAVAILABLE
    assert monitor.state.detail == "database unreachable: QueuePool limit of size 5 overflow 10 reached"


def test_a_probe_failure_is_unavailable_whatever_its_chain_would_classify_as(clock):
    # A bug in a probe while it handled a refused write: no answer came, so nothing is known.
    try:
        try:
            raise READ_ONLY
        except Pg2Error:
            raise RuntimeError("probe bug") from None
    except RuntimeError as exc:
        broken = exc
    assert classify(broken) is Failure.READ_ONLY  # the chain still holds the 25006
    monitor = make(clock, Probe(clock, answer=broken))
    monitor.observe(LOST)
    assert monitor.read_only is True
    assert monitor.state.failure is Failure.UNAVAILABLE
    assert monitor.state.detail == "database unreachable: probe bug"


def test_probe_timeout_must_be_positive():
    with pytest.raises(ValueError, match="probe_timeout"):
        ReadOnlyMonitor(announce_file=None, probe_timeout=0)


def test_unreachable_then_a_standby_is_read_only_not_unavailable(clock, caplog):
    # kill -9 of the primary, then PgBouncer repointed at the hot standby: the first probe finds
    # nothing, the next one a standby. Users must be told "read-only", not "unavailable".
    probe = Probe(clock, answer=Pg2Error('connection to server at "127.0.0.1" failed: Connection refused'))
    monitor = make(clock, probe, recheck=2.0, jitter=0.0)
    monitor.observe(LOST)
    assert monitor.read_only is True
    assert monitor.state.failure is Failure.UNAVAILABLE
    probe.answer = True
    clock.advance(2.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="srht_readonly.monitor"):
        assert monitor.read_only is True
    assert monitor.state.failure is None and monitor.state.detail == "the database refuses writes"
    assert [r.getMessage() for r in caplog.records] == ["database is read-only (probe): the database refuses writes"]
    clock.advance(2.1)
    assert monitor.read_only is True  # still a standby: nothing new, nothing logged
    assert len(caplog.records) == 1


def test_a_probe_answer_older_than_an_observed_failure_is_ignored(clock):
    monitor: ReadOnlyMonitor

    def probe() -> bool:
        monitor.observe(READ_ONLY)  # another thread saw a refusal while this probe ran
        return False

    monitor = make(clock, probe)
    monitor.observe(LOST)
    assert monitor.read_only is True
    assert monitor.state.reason == "error"


def test_one_prober_at_a_time_others_get_the_cached_answer():
    release = threading.Event()
    calls = []

    def slow_probe() -> bool:
        calls.append(threading.get_ident())
        release.wait(10)
        return False

    monitor = ReadOnlyMonitor(probe=slow_probe, recheck=0.05, announce_file=None)
    monitor.observe(READ_ONLY)
    time.sleep(0.06)
    prober = threading.Thread(target=lambda: monitor.read_only)
    prober.start()
    while not calls:
        time.sleep(0.001)
    started = time.monotonic()
    answers = [monitor.read_only for _ in range(200)]
    elapsed = time.monotonic() - started
    release.set()
    prober.join()
    assert answers == [True] * 200
    assert elapsed < 5  # nobody waited for the probe that was running
    assert len(calls) == 1
    assert monitor.read_only is False


def test_without_a_probe_read_only_expires_after_recheck(clock):
    monitor = make(clock, None, recheck=2.0)
    monitor.observe(READ_ONLY)
    assert monitor.read_only is True
    clock.advance(2.0)
    assert monitor.read_only is False
    assert monitor.state.reason == "expired"


def test_manual_state_and_listener_errors_do_not_escape(clock, caplog):
    monitor = make(clock, Probe(clock, answer=True))

    def broken(event: Any) -> None:
        raise RuntimeError("listener bug")

    monitor.add_listener(broken)
    seen = []
    monitor.add_listener(seen.append)
    monitor.set_read_only("drill")
    assert monitor.read_only is True and monitor.state.reason == "manual"
    monitor.set_writable()
    assert monitor.read_only is False
    monitor.remove_listener(seen.append)
    monitor.set_read_only("again")
    assert [e["event"] for e in seen] == ["read-only", "writable"]
    assert any("listener" in r.getMessage() for r in caplog.records)
    assert "read-only" in repr(monitor)


def test_a_read_only_hint_applies_at_once_without_a_query_and_the_recheck_reverifies_it(clock):
    probe = Probe(clock, answer=False)
    monitor = make(clock, probe, recheck=1.0, jitter=0)
    events = []
    monitor.add_listener(events.append)
    monitor.hint(True, "cannot execute UPDATE in a read-only transaction (told by web-1:42)")
    assert monitor.read_only is True and probe.calls == []
    assert monitor.state.reason == "shared" and "told by" in monitor.state.detail
    assert [(e["event"], e["reason"]) for e in events] == [("read-only", "shared")]
    clock.advance(1.0)
    assert monitor.read_only is False  # its own probe disagrees: the hint is gone
    assert monitor.state.reason == "probe" and len(probe.calls) == 1


def test_a_read_only_hint_keeps_a_monitors_own_reason_and_an_unavailable_one_is_said_so(clock):
    monitor = make(clock, Probe(clock, answer=True))
    monitor.observe(READ_ONLY)
    monitor.hint(True, "told", Failure.UNAVAILABLE)
    assert monitor.state.reason == "error" and monitor.state.failure is Failure.READ_ONLY
    other = make(clock, Probe(clock, answer=True))
    other.hint(True, "database unreachable (told by web-1:42)", Failure.UNAVAILABLE)
    assert other.state.failure is Failure.UNAVAILABLE


def test_a_writable_hint_is_believed_only_when_the_probe_agrees(clock):
    probe = Probe(clock, answer=True)
    monitor = make(clock, probe, recheck=600)
    monitor.observe(READ_ONLY)
    monitor.hint(False, "promoted (told by web-1:42)")
    assert monitor.state.read_only is True and len(probe.calls) == 1  # probed at once, still read-only
    probe.answer = False
    monitor.hint(False, "promoted (told by web-1:42)")
    assert monitor.state.read_only is False and monitor.state.reason == "probe"
    monitor.hint(False, "again")  # writable already: nothing to do, no probe
    assert len(probe.calls) == 2


def test_a_writable_hint_without_a_probe_turns_writable_but_never_ends_an_announcement(clock, tmp_path):
    monitor = make(clock, None)
    monitor.hint(True, "told")
    monitor.hint(False, "told")
    assert monitor.state.read_only is False and monitor.state.reason == "shared"
    path = tmp_path / "announce"
    path.write_text("maintenance")
    announced = make(clock, None, announce_file=path)
    assert announced.read_only is True
    announced.hint(False, "told")
    assert announced.read_only is True and announced.state.reason == "announcement"


# --- real servers ------------------------------------------------------------------------------


def wait_until_replicated(standby: Any, table: str) -> None:
    deadline = time.monotonic() + 10
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        while not conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]:
            assert time.monotonic() < deadline, f"{table} never reached the standby"
            time.sleep(0.05)


def counted_engine(url: str, **options: Any) -> tuple[sa.Engine, dict[str, int]]:
    """An engine that counts pool checkouts and cursor executions (the probe does both)."""
    engine = sa.create_engine(url, **options)
    counts = {"checkouts": 0, "statements": 0}

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(*args: Any) -> None:
        counts["statements"] += 1

    @event.listens_for(engine.pool, "checkout")
    def _checkout(*args: Any) -> None:
        counts["checkouts"] += 1

    return engine, counts


@pytest.mark.lab
def test_ten_thousand_reads_while_writable_issue_no_query(srht_lab, tmp_path):
    engine, counts = counted_engine(srht_lab.primary.url)
    monitor = ReadOnlyMonitor(announce_file=tmp_path / "none", recheck=0.5)
    instrument(engine, monitor)
    assert monitor.check() is False
    before = dict(counts)
    assert before["checkouts"] >= 1  # the counter sees probes
    for _ in range(10_000):
        assert monitor.read_only is False
    assert counts == before
    engine.dispose()


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_read_only_failure_through_the_engine_flips_the_monitor_at_once(srht_readonly_db, dialect):
    url = srht_readonly_db.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine, counts = counted_engine(url)
    monitor = ReadOnlyMonitor(announce_file=None)
    instrument(engine, monitor)
    with engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
        conn.exec_driver_sql("CREATE TABLE refused (v int)")
    checkouts = counts["checkouts"]
    assert monitor.state.read_only is True  # without even asking `read_only`
    assert monitor.state.reason == "error"
    assert monitor.read_only is True
    assert counts["checkouts"] == checkouts  # no probe was needed to know
    engine.dispose()


@pytest.mark.lab
def test_probe_answers_for_standby_read_only_database_and_primary(srht_lab, srht_readonly_db):
    cases = {srht_lab.standby.url: True, srht_readonly_db.url: True, srht_lab.primary.url: False,
             srht_lab.pgbouncer.url: False}
    for url, expected in cases.items():
        engine = sa.create_engine(url)
        assert ReadOnlyMonitor(engine, announce_file=None).check() is expected, url
        engine.dispose()


@pytest.mark.lab
def test_probe_never_prepares_statements_with_psycopg3(srht_lab):
    url = srht_lab.primary.url.replace("postgresql://", "postgresql+psycopg://")
    # prepare_threshold=0 would prepare every statement psycopg is allowed to prepare.
    engine = sa.create_engine(url, pool_size=1, connect_args={"prepare_threshold": 0})
    monitor = ReadOnlyMonitor(engine, announce_file=None)
    for _ in range(8):
        assert monitor.check() is False
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("SELECT count(*) FROM pg_prepared_statements", prepare=False)
        assert cur.fetchone() == (0,)
    finally:
        raw.close()
    engine.dispose()


@pytest.mark.lab
def test_probe_through_pgbouncer_transaction_mode_with_psycopg3(srht_lab):
    url = srht_lab.pgbouncer.url.replace("postgresql://", "postgresql+psycopg://")
    engine = sa.create_engine(url, connect_args={"prepare_threshold": 0})
    monitor = ReadOnlyMonitor(engine, announce_file=None)
    others = [psycopg.connect(srht_lab.pgbouncer.dsn, autocommit=True) for _ in range(3)]
    for i in range(12):  # other clients interleave, so server connections change hands
        assert monitor.check() is False
        others[i % 3].execute("SELECT 1", prepare=False)
    for conn in others:
        conn.close()
    engine.dispose()


@pytest.mark.lab
@pytest.mark.parametrize("dialect", ["psycopg2", "psycopg"])
def test_writable_again_within_recheck_plus_one_second_of_promotion(srht_fresh_lab, dialect):
    """The plan's sequence: PgBouncer repointed at the standby (read-only failover), writes
    refused, the old primary shut off, the standby promoted; readers notice by themselves."""
    lab = srht_fresh_lab
    old_primary, standby = lab.primary, lab.standby
    url = lab.pgbouncer.url.replace("postgresql://", f"postgresql+{dialect}://")
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"prepare_threshold": None}
                              if dialect == "psycopg" else {})
    recheck = 2.0
    monitor = ReadOnlyMonitor(announce_file=None, recheck=recheck)
    instrument(engine, monitor)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE promoted (v int)")
    wait_until_replicated(standby, "promoted")
    lab.pgbouncer.point_at(standby)
    with pytest.raises(sa.exc.DBAPIError) as refused, engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO promoted VALUES (1)")
    assert classify(refused.value) is Failure.READ_ONLY
    assert monitor.state.read_only and monitor.state.reason == "error"

    stop = threading.Event()
    seen: list[tuple[float, bool]] = []
    problems: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append((time.monotonic(), monitor.read_only))
            except BaseException as exc:  # a request must never see the monitor fail
                problems.append(exc)
            time.sleep(0.005)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        time.sleep(0.5)
        old_primary.stop(mode="fast")
        lab.promote(standby)
        promoted = time.monotonic()
        while time.monotonic() - promoted < recheck + 3 and monitor.state.read_only:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not problems
    first_writable = min((t for t, ro in seen if not ro), default=None)
    assert first_writable is not None, "no reader saw the database writable again"
    delay = first_writable - promoted
    print(f"\n{dialect}: writable {delay:.2f} s after promotion (recheck {recheck} s)")
    assert delay <= recheck + 1.0, f"writable only {delay:.2f} s after promotion"
    assert all(not ro for t, ro in seen if t > first_writable + 0.05)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO promoted VALUES (2)")
    engine.dispose()


@pytest.mark.lab
def test_after_a_crash_repoint_and_promotion_writable_within_recheck_plus_one_second(srht_fresh_lab):
    """REFERENCE's crash sequence: primary killed, PgBouncer repointed at the standby half a
    second later, standby promoted; the monitor follows without any request failing on it."""
    lab = srht_fresh_lab
    old_primary, standby = lab.primary, lab.standby
    engine = sa.create_engine(lab.pgbouncer.url, connect_args={"connect_timeout": 5})
    recheck = 2.0
    monitor = ReadOnlyMonitor(announce_file=None, recheck=recheck)
    instrument(engine, monitor)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE crashed (v int)")
    wait_until_replicated(standby, "crashed")

    stop = threading.Event()
    seen: list[tuple[float, bool]] = []
    problems: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append((time.monotonic(), monitor.read_only))
            except BaseException as exc:
                problems.append(exc)
            time.sleep(0.005)

    def writer() -> None:
        # A backend of the killed primary may still commit an INSERT on a pooled connection before it
        # notices its postmaster is gone: write until one fails, as a service's next requests would.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql("INSERT INTO crashed VALUES (1)")
            except sa.exc.DBAPIError:
                return  # refused or lost: either way the monitor has heard of it
            time.sleep(0.05)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        old_primary.kill()
        write = threading.Thread(target=writer)
        write.start()
        time.sleep(0.5)
        lab.pgbouncer.point_at(standby)
        repointed = time.monotonic()
        write.join(30)
        while monitor.state.read_only is False and time.monotonic() - repointed < recheck + 3:
            monitor.read_only  # noqa: B018 - a request asking
            time.sleep(0.01)
        assert monitor.state.read_only, "the monitor never noticed the failover"
        noticed = time.monotonic() - repointed
        lab.promote(standby)
        promoted = time.monotonic()
        while time.monotonic() - promoted < recheck + 3 and monitor.state.read_only:
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert not problems
    first_writable = min((t for t, ro in seen if not ro and t > promoted), default=None)
    assert first_writable is not None, "no reader saw the database writable again"
    delay = first_writable - promoted
    print(f"\ncrash: read-only noticed {noticed:.2f} s after the repoint ({monitor.state.reason}), "
          f"writable {delay:.2f} s after promotion")
    assert delay <= recheck + 1.0
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO crashed VALUES (2)")
    engine.dispose()


@pytest.mark.lab
def test_probe_keeps_its_timeout_on_an_autocommit_engine(srht_lab):
    engine = sa.create_engine(srht_lab.standby.url, isolation_level="AUTOCOMMIT")
    monitor = ReadOnlyMonitor(engine, announce_file=None, probe_timeout=0.5)
    for _ in range(3):
        assert monitor.check() is True
    with engine.connect() as conn:  # the connection went back to the pool clean
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar_one() == "0"
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1


def probe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "srht-readonly-probe"]


@pytest.mark.lab
def test_probe_with_the_pool_exhausted_answers_unavailable_within_probe_timeout(srht_lab):
    # The pool's only connection is held by the application: the checkout alone would block for
    # the pool's pool_timeout (30 s), holding the request thread that asked `read_only`.
    engine = sa.create_engine(srht_lab.primary.url, pool_size=1, max_overflow=0)
    monitor = ReadOnlyMonitor(engine, announce_file=None, probe_timeout=0.5)
    held = engine.connect()
    try:
        for attempt in range(2):  # the second while the first probe still waits for the pool
            started = time.monotonic()
            monitor.check()
            elapsed = time.monotonic() - started
            assert elapsed < 0.5 + 1.5, f"probe {attempt + 1} took {elapsed:.1f} s"
            state = monitor.state
            assert state.failure is Failure.UNAVAILABLE, state  # unavailable, not "refuses writes"
            assert state.reason == "probe" and state.detail.startswith("database unreachable: no answer within 0.5 s")
            assert len(probe_threads()) == 1  # the probe left behind; no second one piled up
    finally:
        held.close()
    # The connection is back: the probe left behind ends and gives it back, the next one answers.
    assert monitor.check() is False
    assert monitor.state.failure is None and monitor.state.detail == "the database takes writes"
    assert probe_threads() == []
    with engine.connect() as conn:  # nobody kept the pool's only connection
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1


def test_locks_are_usable_in_a_child_forked_while_a_thread_held_them():
    import subprocess
    import sys

    code = """if True:
        import os, sys, threading
        from srht_readonly import ReadOnlyMonitor
        monitor = ReadOnlyMonitor(announce_file=None, probe=lambda: False)
        monitor._probe_lock.acquire()          # a probe in flight in another thread
        pid = os.fork()
        if pid == 0:
            monitor.observe(type("E", (Exception,), {"pgcode": "25006"})("read-only"))
            ok = monitor.check() is False      # would hang forever on the inherited lock
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

"""srht_readonly.rerun's pure logic: which statements write, the ledger, the rule, the budget.

The same rule on real servers (a backend terminated under a request) is tests/test_flask_retry.py.
"""

from __future__ import annotations

import pytest

from srht_readonly import Failure
from srht_readonly.rerun import Ledger, RetryBudget, current, is_write, recording, why_not


@pytest.mark.parametrize("statement", [
    "SELECT 1", "  select * from repository where id = %(id)s", "/* tag */ SELECT pg_sleep(1)",
    "-- comment\nSELECT 1", "WITH r AS (SELECT 1) SELECT * FROM r", "SHOW transaction_read_only",
    "SAVEPOINT sa_savepoint_1", "RELEASE SAVEPOINT sa_savepoint_1", "ROLLBACK TO SAVEPOINT sa_savepoint_1",
    "SET LOCAL statement_timeout = 100", "VALUES (1)", "EXPLAIN SELECT 1",
    'SELECT "user".updated, "user".last_seen FROM "user"',
])
def test_reads(statement):
    assert is_write(statement) is False


@pytest.mark.parametrize("statement", [
    "INSERT INTO repository (name) VALUES (%(name)s)", "update \"user\" set last_seen = now()", "DELETE FROM x",
    "WITH moved AS (DELETE FROM a RETURNING *) INSERT INTO b SELECT * FROM moved", "CREATE TABLE t (v int)",
    "EXPLAIN ANALYZE UPDATE x SET v = 1", "SELECT * FROM x FOR UPDATE", "SELECT nextval('s')",
    "SELECT * INTO copy FROM x", "TRUNCATE x", "MERGE INTO x USING y ON true WHEN MATCHED THEN DELETE",
    "CALL do_things()", "DO $$ BEGIN END $$", "LOCK TABLE x", "COPY x FROM STDIN", "", "/* only a comment */",
])
def test_writes_and_whatever_is_not_known_to_read(statement):
    assert is_write(statement) is True


def test_the_ledger_forgets_a_rolled_back_write_and_remembers_a_committed_one():
    ledger, a, b = Ledger(), object(), object()
    ledger.statement(a, "SELECT 1")
    ledger.commit(a)
    assert (ledger.wrote, ledger.committed) == (False, False)
    ledger.statement(a, "UPDATE x SET v = 1")
    ledger.rollback(a)
    ledger.commit(a)
    assert (ledger.wrote, ledger.committed) == (True, False)  # rolled back, then an empty commit
    ledger.statement(a, "UPDATE x SET v = 1")
    ledger.commit(b)  # another connection's commit says nothing of a's write
    assert ledger.committed is False
    ledger.commit(a)
    assert ledger.committed is True


def test_recording_sets_the_current_ledger_for_the_block_only():
    assert current() is None
    with recording() as outer:
        assert current() is outer
        with recording() as inner:
            assert current() is inner
        assert current() is outer
    assert current() is None


def ledger_of(*events: str) -> Ledger:
    ledger, conn = Ledger(), object()
    for event in events:
        if event == "commit":
            ledger.commit(conn)
        else:
            ledger.statement(conn, event)
    return ledger


READ = ledger_of("SELECT 1")
WROTE = ledger_of("SELECT 1", "UPDATE x SET v = 1")
COMMITTED = ledger_of("UPDATE x SET v = 1", "commit", "SELECT 1")
READ_COMMITTED = ledger_of("SELECT 1", "commit")


@pytest.mark.parametrize(("failure", "ledger", "method", "opted_out", "allowed"), [
    (Failure.UNAVAILABLE, READ, "GET", False, True),
    (Failure.UNAVAILABLE, READ, "POST", False, True),  # only read so far
    (Failure.UNAVAILABLE, READ_COMMITTED, "DELETE", False, True),  # a read-only transaction's commit
    (Failure.UNAVAILABLE, WROTE, "GET", False, True),  # its write died with the connection
    (Failure.UNAVAILABLE, WROTE, "HEAD", False, True),
    (Failure.UNAVAILABLE, WROTE, "POST", False, False),
    (Failure.UNAVAILABLE, WROTE, "PUT", False, False),
    (Failure.UNAVAILABLE, COMMITTED, "GET", False, False),
    (Failure.UNAVAILABLE, COMMITTED, "POST", False, False),
    (Failure.COMMIT_UNKNOWN, READ, "GET", False, True),  # committing a read-only transaction
    (Failure.COMMIT_UNKNOWN, READ, "POST", False, True),
    (Failure.COMMIT_UNKNOWN, WROTE, "GET", False, False),
    (Failure.COMMIT_UNKNOWN, COMMITTED, "GET", False, False),
    (Failure.READ_ONLY, READ, "GET", False, False),
    (None, READ, "GET", False, False),
    (Failure.UNAVAILABLE, READ, "GET", True, False),
    (Failure.UNAVAILABLE, None, "GET", False, False),
])
def test_the_rule(failure, ledger, method, opted_out, allowed):
    why = why_not(failure, ledger, method=method, opted_out=opted_out)
    assert (why is None) is allowed, why


class Time:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_budget_doubles_jittered_waits_and_stops_within_its_seconds():
    clock = Time()
    budget = RetryBudget(3.0, first=0.05, jitter=0.0, clock=clock, rng=lambda: 1.0)
    waits = []
    while (wait := budget.next_wait()) is not None:
        waits.append(wait)
        clock.now += wait + 0.01  # each attempt takes 10 ms
    assert waits[:4] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert clock.now <= 3.0 + 0.01 * len(waits) and clock.now >= 3.0
    assert budget.attempts == len(waits) + 1


def test_the_budget_and_waits_are_jittered():
    clock = Time()
    low = RetryBudget(3.0, first=0.1, jitter=0.2, clock=clock, rng=lambda: 0.0)
    assert low.seconds == pytest.approx(3.0) and low.next_wait() == pytest.approx(0.05)
    high = RetryBudget(3.0, first=0.1, jitter=0.2, clock=clock, rng=lambda: 1.0)
    assert high.seconds == pytest.approx(2.4) and high.next_wait() == pytest.approx(0.1)
    assert RetryBudget(0.0, clock=clock).next_wait() is None
    with pytest.raises(ValueError):
        RetryBudget(-1)

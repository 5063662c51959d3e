"""Helpers the tests share for talking to the lab's servers directly."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest


def wait_for(check: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; that value, or the test fails naming ``what``."""
    give_up = time.monotonic() + timeout
    while True:
        if value := check():
            return value
        if time.monotonic() >= give_up:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def admin(dsn: str, statement: str) -> list[tuple]:
    """Run ``statement`` (no parameters: ``%`` is literal) in autocommit; its rows, if any."""
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def commit_trigger(dsn: str, table: str, body: str) -> None:
    """Create ``table (v int)`` whose COMMIT runs ``body`` (plpgsql, a deferred constraint trigger):
    a ``pg_sleep`` to lose a connection during COMMIT, a ``RAISE`` to have COMMIT refused."""
    admin(dsn, f"""
        CREATE TABLE IF NOT EXISTS {table} (v int);
        CREATE OR REPLACE FUNCTION {table}_on_commit() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN {body} RETURN NULL; END $$;
        DROP TRIGGER IF EXISTS {table}_on_commit ON {table};
        CREATE CONSTRAINT TRIGGER {table}_on_commit AFTER INSERT ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_on_commit();
    """)


def error_of(fn: Callable[[], object]) -> BaseException:
    """What ``fn()`` raises: the test fails if it raises nothing."""
    try:
        fn()
    except Exception as exc:  # the point: capture whatever the driver raises
        return exc
    pytest.fail("expected the database to refuse")


@contextlib.contextmanager
def bouncer_on_standby(lab: Any) -> Iterator[None]:
    """The plan's read-only failover: PgBouncer repointed at the (caught-up) standby."""
    lab.wait_caught_up(timeout=10)
    lab.pgbouncer.point_at(lab.standby)
    try:
        yield
    finally:
        lab.pgbouncer.point_at(lab.primary)

"""Short SQL conversations with a server: role, positions, timeline.

Every connection here is autocommit with a connect timeout, so a dead node answers
``OpsError`` quickly instead of hanging a procedure.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

from .errors import OpsError, Timeout

CONNECT_TIMEOUT = 3


@contextmanager
def connect(dsn: str, *, timeout: int = CONNECT_TIMEOUT) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit connection to ``dsn``, closed on exit."""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=timeout)
    except psycopg2.Error as exc:
        raise OpsError(f"cannot connect to {redact(dsn)}: {str(exc).strip()}") from exc
    try:
        conn.autocommit = True
        yield conn
    finally:
        conn.close()


def query(dsn: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """All rows of one statement."""
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def query_one(dsn: str, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
    rows = query(dsn, sql, params)
    if not rows:
        raise OpsError(f"{sql!r} returned no row on {redact(dsn)}")
    return rows[0]


def execute(dsn: str, sql: str, params: Sequence[Any] = ()) -> None:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, params)


def role(dsn: str) -> str:
    """``primary`` or ``standby``, observed with ``pg_is_in_recovery()``."""
    (in_recovery,) = query_one(dsn, "SELECT pg_is_in_recovery()")
    return "standby" if in_recovery else "primary"


def timeline(dsn: str) -> int:
    """The timeline the server is on (the one it replays, for a standby)."""
    (tli,) = query_one(dsn, "SELECT timeline_id FROM pg_control_checkpoint()")
    in_recovery = query_one(dsn, "SELECT pg_is_in_recovery()")[0]
    if in_recovery:
        rows = query(dsn, "SELECT received_tli FROM pg_stat_wal_receiver")
        if rows and rows[0][0]:
            return int(max(tli, rows[0][0]))
        return int(tli)
    # After promotion the checkpoint row may still show the old timeline until the next
    # checkpoint; the WAL file name of the current insert position never lags.
    (walfile,) = query_one(dsn, "SELECT pg_walfile_name(pg_current_wal_insert_lsn())")
    return int(walfile[:8], 16)


def positions(dsn: str) -> dict[str, str | None]:
    """WAL positions: ``current`` on a primary; ``receive`` and ``replay`` on a standby."""
    if role(dsn) == "primary":
        (lsn,) = query_one(dsn, "SELECT pg_current_wal_lsn()::text")
        return {"current": lsn, "receive": None, "replay": None}
    receive, replay = query_one(
        dsn, "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
    )
    return {"current": None, "receive": receive, "replay": replay}


def lsn_diff(dsn: str, a: str, b: str) -> int:
    """``a - b`` in bytes, computed by the server."""
    (diff,) = query_one(dsn, "SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", (a, b))
    return int(diff)


def parse_lsn(text: str) -> int:
    """``'0/3000148'`` -> its byte position."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wait_until(check: Any, *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``check()`` until it returns something truthy; ``Timeout`` naming ``what`` otherwise.

    Connection errors count as "not yet": the thing being waited for is often a server coming up.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except OpsError as exc:
            last = exc
        if time.monotonic() >= deadline:
            why = f" (last error: {last})" if last else ""
            raise Timeout(f"timed out after {timeout:g} s waiting for {what}{why}")
        time.sleep(interval)


def redact(dsn: str) -> str:
    """``dsn`` without its password, for messages, logs and JSON.

    Parsed with libpq's own parser, so a password in a URI (``postgresql://u:secret@h/db``),
    quoted with spaces (``password='a b'``) or spaced around ``=`` is removed too; a string libpq
    cannot parse is not shown at all.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error:
        return "(a connection string libpq cannot parse)"
    params.pop("password", None)
    return psycopg2.extensions.make_dsn(**params)

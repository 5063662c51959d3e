"""Short SQL conversations with a server: role, positions, timeline.

Every connection here is autocommit with a connect timeout, so a dead node answers
``OpsError`` quickly instead of hanging a procedure.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

from .errors import OpsError, Timeout

CONNECT_TIMEOUT = 3
#: How many tiny commits ``commit_seconds`` times: their median is the answer, so one stall (a
#: checkpoint, a scheduling hiccup) does not make a slow primary, and one lucky commit does not hide one.
COMMIT_TRIES = 3
#: Seconds between two of them (a random value in this range).
COMMIT_SPACING = (0.05, 0.15)
#: The statement timeout of ``time_commit``'s connection, in milliseconds.
COMMIT_TIMEOUT_MS = 5000


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


def commit_seconds(conn: psycopg2.extensions.connection, *, tries: int = COMMIT_TRIES,
                   spacing: tuple[float, float] = COMMIT_SPACING, pause_first: bool = False) -> float:
    """The median time, in seconds, of ``tries`` tiny writes on ``conn`` (a primary's, not autocommit).

    Each is ``SELECT txid_current()`` and its ``COMMIT``: ``txid_current()`` assigns a transaction
    id, so the commit writes a WAL commit record and waits for it to be flushed (and for synchronous
    standbys, if any): the latency a service's smallest write meets. Connecting is not timed. The
    tries are a random ``spacing`` apart (seconds; before the first too with ``pause_first``, for a
    connection just opened): a commit timed right after another statement runs in the same
    scheduling slice as it and would hide a server starved of CPU or I/O (measured on a
    CPU-throttled lab primary: 0.2-2 ms right after connecting, 100-180 ms spaced).
    The fleet exporter (``srht_readonly_primary_commit_seconds``) and ``status``'s slow-primary
    check both time it so. Raises ``psycopg2.Error`` as the driver does.
    """
    times = []
    for i in range(max(1, tries)):
        if i or pause_first:
            time.sleep(random.uniform(*spacing))
        with conn.cursor() as cur:
            started = time.perf_counter()
            cur.execute("SELECT txid_current()")
            conn.commit()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_commit(dsn: str, *, tries: int = COMMIT_TRIES, timeout_ms: int = COMMIT_TIMEOUT_MS) -> float:
    """``commit_seconds`` on a connection of its own to ``dsn``; ``OpsError`` when it cannot be timed
    (unreachable, a standby, no commit within ``timeout_ms``)."""
    try:
        conn = psycopg2.connect(dsn, connect_timeout=CONNECT_TIMEOUT, application_name="srht-readonly status",
                                options=f"-c statement_timeout={timeout_ms}")
    except psycopg2.Error as exc:
        raise OpsError(f"cannot connect to {redact(dsn)}: {str(exc).strip()}") from exc
    try:
        return commit_seconds(conn, tries=tries, pause_first=True)
    except psycopg2.Error as exc:
        raise OpsError(f"timing a commit on {redact(dsn)} failed: {str(exc).strip()}") from exc
    finally:
        conn.close()


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

"""The monitor's probe: ask the database, through a SQLAlchemy engine's pool, if it takes writes.

Duck-typed (SQLAlchemy is not imported here) and safe behind PgBouncer in transaction mode:
one transaction, ``SET LOCAL`` only, and never a server-side prepared statement (psycopg 3
would auto-prepare a query it ran five times; ``prepare=False`` forbids it).

The whole probe (pool checkout, connecting, waiting in PgBouncer's queue, the query) is bounded:
it runs in a thread of its own, and the caller (a request thread) stops waiting after
``timeout`` seconds. A probe left behind finishes in its thread and gives its connection back;
until then, a new probe of the same engine waits for it (within its own ``timeout``) rather
than start another, so at most one probe thread per engine is ever waiting on the pool.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

logger = logging.getLogger("srht_readonly.monitor")

#: The probe thread of each engine still running, if any.
_running: weakref.WeakKeyDictionary[Any, threading.Thread] = weakref.WeakKeyDictionary()
_running_lock = threading.Lock()

PROBE_SQL = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"


def _execute(cursor: Any, sql: str, psycopg3: bool) -> None:
    if psycopg3:
        cursor.execute(sql, prepare=False)
    else:
        cursor.execute(sql)


def probe_engine(engine: Any, *, timeout: float) -> bool:
    """True if the database behind ``engine`` refuses writes, False if it takes them.

    Returns or raises within ``timeout`` seconds (plus a thread start): ``TimeoutError`` when
    no answer came in time (the pool is exhausted, the server does not answer, ...), the
    driver's exception if the database cannot be reached; the connection used is then
    invalidated so the pool does not hand it out again.
    """
    deadline = time.monotonic() + timeout
    outcome: list[Any] = []
    done, abandoned = threading.Event(), threading.Event()
    worker = threading.Thread(target=_probe_in_thread, args=(engine, timeout, outcome, done, abandoned),
                              name="srht-readonly-probe", daemon=True)
    while True:
        with _running_lock:
            earlier = _running.get(engine)
            if earlier is None or not earlier.is_alive():
                _running[engine] = worker
                break
        earlier.join(max(0.0, deadline - time.monotonic()))
        if earlier.is_alive():
            raise TimeoutError(f"no answer within {timeout:g} s: an earlier probe is still waiting "
                               "for a connection or for the server")
    worker.start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        abandoned.set()
        raise TimeoutError(f"no answer within {timeout:g} s (waiting for a connection from the pool, "
                           "for the server, or for the query)")
    if not outcome:
        raise RuntimeError("the probe's thread ended without an answer")
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return bool(outcome[0])


def _probe_in_thread(engine: Any, timeout: float, outcome: list[Any], done: threading.Event,
                     abandoned: threading.Event) -> None:
    try:
        outcome.append(_probe(engine, timeout))
    except Exception as exc:  # the caller raises it, if it still waits
        outcome.append(exc)
        if abandoned.is_set():
            logger.debug("a probe nobody waited for any more failed: %s", exc)
    finally:
        done.set()
        with _running_lock:
            if _running.get(engine) is threading.current_thread():
                del _running[engine]


def _probe(engine: Any, timeout: float) -> bool:
    raw = engine.raw_connection()
    try:
        driver = getattr(raw, "driver_connection", None) or raw
        psycopg3 = hasattr(driver, "prepare_threshold")
        # An AUTOCOMMIT engine would run each statement alone and ignore SET LOCAL.
        explicit = bool(getattr(driver, "autocommit", False))
        cursor = raw.cursor()
        try:
            if explicit:
                _execute(cursor, "BEGIN", psycopg3)
            _execute(cursor, f"SET LOCAL statement_timeout = {max(1, int(timeout * 1000))}", psycopg3)
            _execute(cursor, PROBE_SQL, psycopg3)
            in_recovery, read_only = cursor.fetchone()
            if explicit:
                _execute(cursor, "ROLLBACK", psycopg3)
        finally:
            cursor.close()
        if not explicit:
            driver.rollback()
    except Exception:
        try:
            raw.invalidate()
        except Exception:  # the connection is gone already; nothing more to release
            logger.debug("invalidating the probe's connection failed", exc_info=True)
        raise
    raw.close()
    return bool(in_recovery) or str(read_only).lower() == "on"


def _after_fork_in_child() -> None:
    # Probe threads do not survive fork(), and the lock may have been held by one of them.
    global _running_lock
    _running_lock = threading.Lock()
    _running.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

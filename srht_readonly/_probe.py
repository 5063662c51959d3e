"""The monitor's probe: ask the database, through a SQLAlchemy engine's pool, if it takes writes.

Duck-typed (SQLAlchemy is not imported here) and safe behind PgBouncer in transaction mode:
one transaction, ``SET LOCAL`` only, and never a server-side prepared statement (psycopg 3
would auto-prepare a query it ran five times; ``prepare=False`` forbids it).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("srht_readonly.monitor")

PROBE_SQL = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')"


def _execute(cursor: Any, sql: str, psycopg3: bool) -> None:
    if psycopg3:
        cursor.execute(sql, prepare=False)
    else:
        cursor.execute(sql)


def probe_engine(engine: Any, *, timeout: float) -> bool:
    """True if the database behind ``engine`` refuses writes, False if it takes them.

    Raises the driver's exception if the database cannot be reached; the connection used is
    then invalidated so the pool does not hand it out again.
    """
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

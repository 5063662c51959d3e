"""Helpers the tests share for talking to the lab's servers directly."""

from __future__ import annotations

import psycopg2


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

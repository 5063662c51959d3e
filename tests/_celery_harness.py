"""Test harness: the webhook worker's processes (from ``integrations.webhooks.harness``), lab waits.

``RedisServer``, ``CeleryWorker``, ``WebhookReceiver`` and their context managers live in
``integrations/webhooks/harness.py`` so that the installed drill can use them too; they are
re-exported here for the tests.
"""

from __future__ import annotations

from integrations.webhooks.harness import (
    CeleryWorker,
    HarnessError,
    RedisServer,
    WebhookReceiver,
    celery_worker,
    redis_server,
)
from tests._db import wait_for

__all__ = ["CeleryWorker", "HarnessError", "RedisServer", "WebhookReceiver", "celery_worker", "redis_server",
           "wait_for", "wait_replicated"]


def wait_replicated(lab, query: str, expected: object, timeout: float = 10, dbname: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Wait until the lab's standby answers ``query`` with ``expected`` (its replay caught up)."""
    import psycopg2

    dsn = lab.standby.dsn if dbname is None else lab.standby.dsn_for(dbname=dbname)

    def caught_up() -> bool:
        try:
            conn = psycopg2.connect(dsn)
        except psycopg2.OperationalError:  # the database itself is not replayed yet
            return False
        try:
            with conn, conn.cursor() as cur:
                cur.execute(query)
                return bool(cur.fetchone()[0] == expected)
        except psycopg2.errors.UndefinedTable:
            return False
        finally:
            conn.close()

    wait_for(caught_up, timeout=timeout, what="the standby to replay the primary's writes")

"""Tasks for tests/test_celery.py, run by a real ``celery -A tests._celery_app worker``.

Each task writes a marker row into ``marks`` of the database whose DSN it is given, so one
worker serves a read-only database, a writable one and an unreachable one alike.
"""

from __future__ import annotations

import os

import psycopg2
from celery import Celery

from srht_readonly.celery import install
from srht_readonly.errors import mark_commit

app = Celery(
    "srht_readonly_tests",
    broker=os.environ.get("SRHT_TEST_BROKER", "redis://127.0.0.1:1/0"),
    backend=os.environ.get("SRHT_TEST_BACKEND", "redis://127.0.0.1:1/1"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue="srht-tests",
)


def _insert(dsn: str, marker: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=2)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("INSERT INTO marks (marker) VALUES (%s)", (marker,))
    finally:
        conn.close()


@app.task(bind=True, name="tests.autoretry_write", autoretry_for=(Exception,), max_retries=3, default_retry_delay=0)
def autoretry_write(self, dsn: str, marker: str) -> str:
    _insert(dsn, marker)
    return marker


@app.task(bind=True, name="tests.explicit_retry_write", max_retries=3)
def explicit_retry_write(self, dsn: str, marker: str) -> str:
    try:
        _insert(dsn, marker)
    except psycopg2.Error as exc:
        raise self.retry(exc=exc, countdown=0) from exc
    return marker


@app.task(name="tests.deferred_write", on_read_only="defer", read_only_countdown=(0.2, 0.5), read_only_deadline=30)
def deferred_write(dsn: str, marker: str) -> str:
    _insert(dsn, marker)
    return marker


@app.task(name="tests.deferred_write_short", on_read_only="defer", read_only_countdown=(0.2, 0.5),
          read_only_deadline=2)
def deferred_write_short(dsn: str, marker: str) -> str:
    _insert(dsn, marker)
    return marker


@app.task(name="tests.broken_sql", autoretry_for=(Exception,), max_retries=1, default_retry_delay=0)
def broken_sql(dsn: str) -> None:
    conn = psycopg2.connect(dsn, connect_timeout=2)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELEC 1")
    finally:
        conn.close()


def _lose_commit() -> None:
    raise mark_commit(psycopg2.OperationalError("server closed the connection unexpectedly"))


@app.task(name="tests.commit_unknown_deferring", on_read_only="defer", read_only_countdown=(0.1, 0.2))
def commit_unknown_deferring() -> None:
    _lose_commit()


@app.task(name="tests.commit_unknown_idempotent", on_read_only="defer", read_only_countdown=(0.1, 0.2),
          read_only_deadline=1, read_only_idempotent=True)
def commit_unknown_idempotent() -> None:
    _lose_commit()


readonly_tasks = install(app)


@app.task(name="tests.defined_after_install")
def defined_after_install(dsn: str, marker: str) -> str:
    _insert(dsn, marker)
    return marker

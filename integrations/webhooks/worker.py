"""core.sr.ht's ``make_worker`` and ``async_request``, with srht-readonly's Celery adapter installed.

Two tasks:

* ``webhooks.async_request`` is core.sr.ht's: POST the payload (5 s timeout), then UPDATE the
  delivery row with the response. While the database is read-only the UPDATE fails, and the
  task ends FAILURE in one log line, with no retry and no mail: the plan says webhook workers
  may simply fail.
* ``webhooks.async_request_durable`` is for deliveries that must not be lost: it locks the
  delivery row (``SELECT ... FOR UPDATE``, refused by a read-only database *before* anything is
  sent), skips rows that already have a response, POSTs, and records the response in the same
  transaction. It defers (``on_read_only="defer"``) until the database takes writes again, so a
  failover neither loses nor (short of a crash mid-POST) repeats the delivery.

Every other exception goes through core.sr.ht's wrapper: rolled back, "mailed" (logged at ERROR
with the ``[mail]`` prefix, standing in for ``srht.email.mail_exception``) and swallowed. The
wrapper lets failover failures through, which is the one change a real ``make_worker`` needs.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import requests
from celery import Celery, signals
from sqlalchemy import Connection, text

from srht_readonly import ReadOnlyMonitor, classify
from srht_readonly.celery import DEFER, install
from srht_readonly.sqlalchemy import instrument

from .schema import connect

__all__ = ["make_worker", "mail_exception"]

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


def mail_exception(ex: BaseException, context: str) -> None:
    """Stand-in for ``srht.email.mail_exception``: one ERROR record with the traceback."""
    logger.error("[mail] to the admins: exception in %s: %s", context, ex, exc_info=ex)


def _post(url: str, payload: str, headers: dict[str, str], timeout: float) -> tuple[str, int, str | None]:
    """POST like core.sr.ht: (response text, status, headers); -1 on timeout, -2 if unreachable."""
    try:
        r = requests.post(url, data=payload, timeout=timeout, headers=headers)
    except requests.exceptions.Timeout:
        return f"Request timed out after {timeout:g} seconds.", -1, None
    except requests.exceptions.ConnectionError as exc:
        return f"Connection failed: {exc}", -2, None
    return r.text, r.status_code, "\n".join(f"{key}: {value}" for key, value in r.headers.items())


def _table(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a delivery table name: {name!r}")
    return name


def _record(conn: Connection, table: str, delivery_id: int, response: tuple[str, int, str | None]) -> None:
    body, status, headers = response
    conn.execute(
        text(f"UPDATE {_table(table)} SET response = :response, response_status = :status, "
             "response_headers = :headers WHERE id = :id"),
        {"response": body, "status": status, "headers": headers, "id": delivery_id},
    )


def make_worker(
    broker: str = "redis://",
    *,
    database_url: str,
    backend: str | None = None,
    monitor: ReadOnlyMonitor | None = None,
    recheck: float = 2.0,
    defer_deadline: float = 3600.0,
    defer_countdown: tuple[float, float] = (1.0, 60.0),
    queue: str = "webhooks",
) -> Celery:
    """The webhook worker's Celery app (tasks ``webhooks.async_request`` and ``..._durable``).

    ``database_url`` is the service's connection string (through PgBouncer in production);
    ``monitor`` defaults to a new :class:`ReadOnlyMonitor` probing through it every ``recheck``
    seconds while read-only. ``defer_deadline`` and ``defer_countdown`` bound the deferral of
    the durable task (see ``srht_readonly.celery``).
    """
    worker = Celery("webhooks", broker=broker, backend=backend, set_as_current=False)
    worker.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
    )
    engine = connect(database_url)
    monitor = monitor or ReadOnlyMonitor(engine, recheck=recheck)
    instrument(engine, monitor)
    worker.srht_readonly_monitor = monitor  # type: ignore[attr-defined]  # for service.py's metrics

    @signals.worker_process_init.connect(weak=False)
    def _forget_parents_connections(**_: Any) -> None:
        engine.dispose(close=False)  # a prefork child must not share the parent's sockets

    def task(**options: Any) -> Callable[[Callable[..., Any]], Any]:
        """core.sr.ht's wrapper: roll back, mail and swallow what the task raises..."""

        def decorate(func: Callable[..., Any]) -> Any:
            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return func(*args, **kwargs)
                except Exception as ex:
                    if classify(ex) is not None:
                        raise  # ...except failover failures: srht_readonly.celery ends those cleanly
                    mail_exception(ex, context="webhook process")
                    return None

            return worker.task(shared=False, **options)(wrapper)

        return decorate

    @task(name="webhooks.async_request")
    def async_request(
        url: str,
        payload: str,
        headers: dict[str, str],
        delivery_table: str | None = None,
        delivery_id: int | None = None,
        timeout: float = 5,
    ) -> int:
        """POST ``payload`` to ``url``, then record the response in the delivery row, if any."""
        response = _post(url, payload, headers, timeout)
        if delivery_table and delivery_id:
            with engine.begin() as conn:
                _record(conn, delivery_table, delivery_id, response)
        return response[1]

    @task(name="webhooks.async_request_durable", on_read_only=DEFER)
    def async_request_durable(
        url: str, payload: str, headers: dict[str, str], delivery_table: str, delivery_id: int, timeout: float = 5,
    ) -> int | None:
        """Deliver once and record it, deferring while the database is read-only."""
        with engine.begin() as conn:
            # Row lock first: a read-only database refuses it before anything is sent.
            done = conn.execute(
                text(f"SELECT response IS NOT NULL FROM {_table(delivery_table)} WHERE id = :id FOR UPDATE"),
                {"id": delivery_id},
            ).scalar_one()
            if done:
                return None
            response = _post(url, payload, headers, timeout)
            _record(conn, delivery_table, delivery_id, response)
        return response[1]

    install(worker, monitor, defer_deadline=defer_deadline, defer_countdown=defer_countdown)
    return worker

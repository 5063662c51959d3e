"""The webhook worker stand-in across a real failover: PgBouncer on the standby, then promotion.

A fresh lab, a private Redis and a real ``celery -A integrations.webhooks.service worker``.
"""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select

from integrations.webhooks import make_worker
from integrations.webhooks import schema as webhooks
from srht_readonly import ReadOnlyError
from srht_readonly.celery import COUNTERS_TASK
from tests._celery_harness import WebhookReceiver, celery_worker, redis_server, wait_for, wait_replicated

pytestmark = pytest.mark.lab


def deliveries(engine, count: int, url: str) -> list[int]:
    webhooks.create(engine)
    with engine.begin() as conn:
        return [webhooks.new_delivery(conn, url, "") for _ in range(count)]


def payload(delivery_id: int) -> str:
    return json.dumps({"delivery": delivery_id, "event": "repo:post-update"})


def response_of(engine, delivery_id: int):
    with engine.connect() as conn:
        return conn.execute(
            select(webhooks.delivery.c.response_status, webhooks.delivery.c.response)
            .where(webhooks.delivery.c.id == delivery_id)
        ).one()


def test_webhooks_fail_cleanly_while_read_only_and_succeed_or_complete_after_promotion(srht_fresh_lab, tmp_path):
    lab = srht_fresh_lab
    engine = webhooks.connect(lab.pgbouncer.url)
    with WebhookReceiver() as receiver, redis_server(tmp_path / "redis") as broker:
        plain, durable = deliveries(engine, 2, receiver.url)
        wait_replicated(lab, "SELECT count(*) FROM webhook_delivery", 2)
        lab.pgbouncer.point_at(lab.standby)  # the plan's read-only failover
        env = {"SRHT_WEBHOOKS_BROKER": broker.url(0), "SRHT_WEBHOOKS_BACKEND": broker.url(1),
               "SRHT_WEBHOOKS_DATABASE": lab.pgbouncer.url, "SRHT_WEBHOOKS_RECHECK": "0.5",
               "SRHT_WEBHOOKS_DEFER_COUNTDOWN": "0.2,1"}
        client = make_worker(broker.url(0), backend=broker.url(1), database_url=lab.pgbouncer.url)
        async_request = client.tasks["webhooks.async_request"]
        async_durable = client.tasks["webhooks.async_request_durable"]
        try:
            with celery_worker("integrations.webhooks.service", tmp_path / "worker", env=env,
                               queues="webhooks") as worker:
                # 1. core.sr.ht's task while read-only: POSTed, UPDATE refused, FAILURE in one line.
                failed = async_request.delay(receiver.url, payload(plain), {}, webhooks.TABLE, plain)
                with pytest.raises(ReadOnlyError, match="read-only"):
                    failed.get(timeout=20)
                assert failed.state == "FAILURE"
                wait_for(lambda: any(" raised " in x for x in worker.lines_about(failed.id)), timeout=10,
                         what="failure line")
                lines = worker.lines_about(failed.id)
                assert len(lines) == 2, lines  # received + one failure line
                assert "webhooks.async_request" in lines[-1] and "raised expected: ReadOnlyError(" in lines[-1]
                assert "cannot execute UPDATE in a read-only transaction" in lines[-1]
                assert not [x for x in lines if " retry: " in x]
                assert response_of(engine, plain) == (None, None)

                # 2. the durable task defers, and sends nothing while it cannot record.
                deferred = async_durable.delay(receiver.url, payload(durable), {}, webhooks.TABLE, durable)
                wait_for(lambda: len([x for x in worker.lines_about(deferred.id) if " retry: " in x]) >= 2, timeout=15,
                         what="two deferrals")
                assert not deferred.ready()
                assert payload(durable) not in receiver.bodies()

                # 3. promotion: the deferred delivery completes, once.
                promotion = lab.promote(lab.standby)
                promoted_at = time.monotonic()
                assert deferred.get(timeout=30) == 200
                completed_in = time.monotonic() - promoted_at
                assert receiver.bodies().count(payload(durable)) == 1
                assert response_of(engine, durable) == (200, "thanks")

                # 4. the same task as in 1, after promotion: succeeds and records the response.
                again = async_request.delay(receiver.url, payload(plain), {}, webhooks.TABLE, plain)
                assert again.get(timeout=20) == 200
                assert response_of(engine, plain) == (200, "thanks")

                counts = client.send_task(COUNTERS_TASK, queue="webhooks").get(timeout=10)["counters"]
                deferrals = [x for x in worker.lines_about(deferred.id) if " retry: " in x]
                log = worker.lines()
                print(f"\npromotion took {promotion.seconds:.2f} s; deferred delivery done {completed_in:.2f} s "
                      f"after it, {len(deferrals)} deferrals; counters {counts}")
                assert not [x for x in log if "[mail]" in x]
                assert not [x for x in log if "Traceback" in x]
                assert {"task": "webhooks.async_request", "outcome": "failed", "failure": "read_only",
                        "count": 1} in counts
                assert completed_in < 10
        finally:
            client.close()
            engine.dispose()

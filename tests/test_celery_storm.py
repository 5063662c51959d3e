"""A storm: 200 webhook tasks queued during a 10 s read-only window, on a real worker and failover.

180 are core.sr.ht's ``async_request`` (fail while read-only), 20 the durable variant (defer).
Behaviour is asserted (everything finishes, nothing loops, one failure line per failed task, no
mail, no traceback); speed is only reported.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
from celery.result import AsyncResult
from sqlalchemy import select

from integrations.webhooks import make_worker
from integrations.webhooks import schema as webhooks
from tests._celery_harness import WebhookReceiver, celery_worker, redis_server, wait_for, wait_replicated
from tests.test_celery_webhooks import deliveries, payload

pytestmark = pytest.mark.lab

TASKS = 200
DURABLE_EVERY = 10  # one task in ten is the deferring kind
WINDOW = 10.0
COUNTDOWN = (0.2, 1.0)
RECHECK = 0.5
TASK_ID = re.compile(r"\[([0-9a-f-]{36})\]")


def test_storm_of_200_tasks_in_a_10_s_read_only_window_finishes_without_retry_loops(srht_fresh_lab, tmp_path):
    lab = srht_fresh_lab
    engine = webhooks.connect(lab.pgbouncer.url)
    with WebhookReceiver() as receiver, redis_server(tmp_path / "redis") as broker:
        ids = deliveries(engine, TASKS, receiver.url)
        wait_replicated(lab, "SELECT count(*) FROM webhook_delivery", TASKS)
        env = {"SRHT_WEBHOOKS_BROKER": broker.url(0), "SRHT_WEBHOOKS_BACKEND": broker.url(1),
               "SRHT_WEBHOOKS_DATABASE": lab.pgbouncer.url, "SRHT_WEBHOOKS_RECHECK": str(RECHECK),
               "SRHT_WEBHOOKS_DEFER_COUNTDOWN": f"{COUNTDOWN[0]:g},{COUNTDOWN[1]:g}"}
        client = make_worker(broker.url(0), backend=broker.url(1), database_url=lab.pgbouncer.url)
        plain = client.tasks["webhooks.async_request"]
        durable = client.tasks["webhooks.async_request_durable"]
        try:
            with celery_worker("integrations.webhooks.service", tmp_path / "worker", env=env, queues="webhooks",
                               concurrency=2) as worker:
                lines_before = len(worker.lines())
                lab.pgbouncer.point_at(lab.standby)
                window_start = time.monotonic()
                sent: dict[str, tuple[str, int]] = {}
                for n, delivery in enumerate(ids):  # a burst at the start of the window
                    kind, task = ("durable", durable) if n % DURABLE_EVERY == 0 else ("plain", plain)
                    result = task.delay(receiver.url, payload(delivery), {}, webhooks.TABLE, delivery)
                    sent[result.id] = (kind, delivery)
                queued = time.monotonic()
                plain_results = [AsyncResult(t, app=client) for t, (kind, _) in sent.items() if kind == "plain"]
                drained = None
                while time.monotonic() < window_start + WINDOW:
                    if drained is None and all(r.ready() for r in plain_results):
                        drained = time.monotonic()
                    time.sleep(0.1)
                lab.promote(lab.standby)
                promoted = time.monotonic()
                results = {task_id: AsyncResult(task_id, app=client) for task_id in sent}
                wait_for(lambda: all(r.ready() for r in results.values()), timeout=60, interval=0.2,
                         what="all 200 tasks to finish")
                finished = time.monotonic()
                time.sleep(0.3)  # let the last log lines reach the file
                log = worker.lines()[lines_before:]
        finally:
            client.close()

        states = Counter((kind, results[task_id].state) for task_id, (kind, _) in sent.items())
        per_task: dict[str, list[str]] = {task_id: [] for task_id in sent}
        unattributed = 0
        for line in log:
            match = TASK_ID.search(line)
            if match and match.group(1) in per_task:
                per_task[match.group(1)].append(line)
            else:
                unattributed += 1
        retries = {task_id: sum(" retry: " in x for x in lines) for task_id, lines in per_task.items()}
        finals = {task_id: sum((" raised " in x) or (" succeeded in " in x) for x in lines)
                  for task_id, lines in per_task.items()}
        plain_ids = [t for t, (kind, _) in sent.items() if kind == "plain"]
        durable_ids = [t for t, (kind, _) in sent.items() if kind == "durable"]
        failed_lines = [x for x in log if " raised " in x]
        took = finished - window_start
        durable_retries = sorted(retries[t] for t in durable_ids)
        lines_of = {kind: sum(len(per_task[t]) for t in ids_) / len(ids_)
                    for kind, ids_ in (("plain", plain_ids), ("durable", durable_ids))}
        failed = sum(n for (_, state), n in states.items() if state == "FAILURE")
        drain = f"{len(plain_ids) / (drained - window_start):.1f} tasks/s" if drained else "not within the window"
        print(
            f"\nstorm: {TASKS} tasks queued in {queued - window_start:.2f} s at the start of a {WINDOW:g} s "
            f"read-only window; the {len(plain_ids)} fail-policy tasks drained at {drain}; all finished "
            f"{finished - promoted:.2f} s after the promotion ({TASKS / took:.1f} tasks/s over {took:.1f} s)\n"
            f"states: {dict(states)}\n"
            f"log: {len(log)} lines = {len(log) / TASKS:.2f} lines/task; fail-policy tasks {lines_of['plain']:.2f} "
            f"lines each (received + one failure line), durable {lines_of['durable']:.2f} (2 per deferral); "
            f"failure lines {len(failed_lines)} for {failed} failed tasks; {unattributed} lines name no task "
            f"(the monitor's state changes)\n"
            f"retries of fail-policy tasks: {sum(retries[t] for t in plain_ids)}; deferrals per durable task: "
            f"min {durable_retries[0]}, median {durable_retries[len(durable_retries) // 2]}, max {durable_retries[-1]}"
        )

        # Everything finished, the plain tasks without a single retry and with exactly one final line.
        assert all(results[t].state in ("SUCCESS", "FAILURE") for t in sent)
        assert sum(retries[t] for t in plain_ids) == 0
        assert all(finals[t] == 1 for t in sent), {t: per_task[t] for t in sent if finals[t] != 1}
        assert all("raised expected: ReadOnlyError(" in x for x in failed_lines)
        assert drained is not None  # the burst was worked off while still read-only...
        assert states[("plain", "FAILURE")] == len(plain_ids)  # ...so every fail-policy task failed
        # Durable tasks all completed, each delivered once and recorded; deferrals stayed bounded.
        assert states[("durable", "SUCCESS")] == len(durable_ids)
        bodies = Counter(receiver.bodies())
        assert all(bodies[payload(sent[t][1])] == 1 for t in durable_ids)
        # Countdowns >= first/2, doubling to cap/2 at least: a few dozen at most over the window.
        bound = 5 + int((WINDOW + 5) / (COUNTDOWN[1] / 2))
        assert durable_retries[-1] <= bound, durable_retries
        # No mail, no traceback, and the database agrees with the task states.
        assert not [x for x in log if "[mail]" in x or "Traceback" in x]
        with engine.connect() as conn:
            rows = dict(conn.execute(select(webhooks.delivery.c.id, webhooks.delivery.c.response_status)).all())
        for task_id, (_, delivery) in sent.items():
            expected = 200 if results[task_id].state == "SUCCESS" else None
            assert rows[delivery] == expected, (task_id, results[task_id].state, rows[delivery])
        engine.dispose()

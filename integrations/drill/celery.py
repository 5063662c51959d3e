"""core.sr.ht's webhook worker under a stream of deliveries: Redis, a real ``celery worker``.

Set up once: a private ``redis-server`` (broker and result backend), a ``celery -A
integrations.webhooks.service worker`` process on the drill's database, and a pool of delivery
rows queued while the database takes writes (as the web application does when it generates
webhooks). Each client loop queues ``webhooks.async_request`` for one of those rows (POST to the
drill's receiver, then UPDATE the row) and waits for the task's final state:

* ``SUCCESS``: ``ok``;
* ``FAILURE`` with ``ReadOnlyError`` or ``DatabaseUnavailable``: ``explained``, the plan's
  "webhook workers may simply fail", in one clean line;
* any other failure, or no result within ``TASK_TIMEOUT`` seconds: ``error``.

A task still pending when the traffic stops is judged like any operation in flight: the runner
gives it time to end, then records it as hung if it was queued before the grace period (one
queued moments ago is not judged). Retries are counted from the worker's log: a failover must
not start a retry storm.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from typing import Any

from celery.result import AsyncResult
from sqlalchemy import Engine

from integrations.webhooks import make_worker
from integrations.webhooks import schema as webhooks
from integrations.webhooks.harness import CeleryWorker, RedisServer
from srht_readonly import DatabaseUnavailable, ReadOnlyError
from srht_readonly.drill import Operation, Outcome, Recorder, State, verdicts
from srht_readonly.drill.scenarios import Expectation, Fact
from srht_readonly.drill.services import DrillEnvironment
from srht_readonly.ops.ports import free_port

from ._metrics import ScrapedMetrics
from ._traffic import Traffic

__all__ = ["CeleryTraffic"]

#: load -> (client loops, worker processes, pause between tasks in seconds)
LOADS = {"typical": (2, 2, 0.2), "excessive": (4, 3, 0.05)}
DELIVERIES = 32
TASK_TIMEOUT = 20.0
RETRY_LINE = r"webhooks\.async_request\[[^]]*\] retry: "


class CeleryTraffic(Traffic):
    """Runs Redis and a webhook worker for the drill's lifetime and queues deliveries to it."""

    name = "celery"
    kinds = ("deliver",)

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine, webhook_url: str) -> None:
        threads, processes, pause = LOADS[env.load]
        super().__init__(threads=threads, pause=pause)
        directory = env.directory / "celery"
        metrics_dir = directory / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        metrics_port = free_port("127.0.0.1")
        self.redis = RedisServer(directory / "redis")
        stack.callback(self.redis.stop)
        self.redis.start()
        self.worker = CeleryWorker("integrations.webhooks.service", directory / "worker", name="srht-drill",
                                   queues="webhooks", concurrency=processes, env={
                                       "SRHT_WEBHOOKS_BROKER": self.redis.url(0),
                                       "SRHT_WEBHOOKS_BACKEND": self.redis.url(1),
                                       "SRHT_WEBHOOKS_DATABASE": env.database_url,
                                       "SRHT_WEBHOOKS_RECHECK": "0.5",
                                       "SRHT_WEBHOOKS_METRICS_PORT": str(metrics_port),
                                       "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                                   })
        stack.callback(self.worker.stop)
        self.worker.start()
        self.metrics = ScrapedMetrics("webhooks", f"http://127.0.0.1:{metrics_port}/metrics")
        self.client = make_worker(self.redis.url(0), backend=self.redis.url(1), database_url=env.database_url)
        stack.callback(self.client.close)
        stack.callback(self.close)
        self.task = self.client.tasks["webhooks.async_request"]
        self.url = webhook_url
        webhooks.create(engine)
        with engine.begin() as conn:
            self.deliveries = [webhooks.new_delivery(conn, webhook_url, "") for _ in range(DELIVERIES)]
        self._next = itertools.cycle(self.deliveries)
        self._lock = threading.Lock()
        self._retries = {"start": 0, "stop": 0}

    def start(self, recorder: Recorder) -> None:
        self._retries = {"start": self.worker.count(RETRY_LINE), "stop": -1}
        super().start(recorder)

    def stop(self) -> None:
        super().stop()
        self._retries["stop"] = self.worker.count(RETRY_LINE)

    def step(self, worker: int) -> None:
        with self._lock:
            delivery = next(self._next)
        body = json.dumps({"event": "repo:post-update", "delivery": delivery})
        operation = self.begin("deliver", write=True)
        try:
            result = self.task.delay(self.url, body, {}, webhooks.TABLE, delivery)
        except Exception as exc:  # the broker is ours and local: queuing should not fail
            self.end(operation, Outcome.ERROR, detail=f"could not queue: {exc!r}")
            return
        self._wait(result, operation)

    def _wait(self, result: AsyncResult, operation: Operation) -> None:
        while not result.ready():
            if time.monotonic() - operation.started > TASK_TIMEOUT:
                self.end(operation, Outcome.ERROR, detail=f"no result after {TASK_TIMEOUT:g} s (state {result.state})")
                return
            time.sleep(0.02)
        outcome, detail, met = judge(result)
        self.end(operation, outcome, detail=detail, met=met)
        result.forget()

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts, kinds=self.kinds)
        self.metrics.finish(recorder)
        checks.append(self.metrics.expectation(scenario, events, facts, policy="celery", outcome="failed"))
        if scenario in (*verdicts.READ_ONLY_WINDOW, *verdicts.CRASHES):
            retried = self._retries["stop"] - self._retries["start"]
            checks.append(Expectation("celery: no delivery was retried (no retry storm)", retried == 0,
                                      f"{retried} retries in the worker's log"))
        if scenario in verdicts.READ_ONLY_WINDOW and Fact.READ_ONLY_UNTIL in facts:
            inside = verdicts.judged_read_only(events, facts)
            wrong = [e for e in inside if e.outcome is not Outcome.EXPLAINED or "ReadOnlyError" not in e.detail]
            checks.append(Expectation("celery: deliveries that met the read-only state failed cleanly with "
                                      "ReadOnlyError", bool(inside) and not wrong,
                                      f"{len(inside)} deliveries, {verdicts.sample(wrong, 'otherwise')}",
                                      wrong + [e for e in inside if e not in wrong]))
        return checks


def judge(result: AsyncResult) -> tuple[Outcome, str, State | None]:
    """A finished task's outcome for the drill, and the state of the database it met."""
    state = result.state
    if state == "SUCCESS":
        return Outcome.OK, f"receiver answered {result.result}", State.WRITABLE
    error = result.result
    if state == "FAILURE" and isinstance(error, ReadOnlyError | DatabaseUnavailable):
        met = State.READ_ONLY if isinstance(error, ReadOnlyError) else State.UNAVAILABLE
        return Outcome.EXPLAINED, f"FAILURE {type(error).__name__}: {error}"[:200], met
    return Outcome.ERROR, f"{state}: {error!r}"[:200], None

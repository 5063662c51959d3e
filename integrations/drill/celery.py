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

A task still pending when the traffic stops is waited for up to ``_traffic.STOP_WAIT`` seconds
and otherwise left unjudged (it was queued moments ago). Retries are counted from the worker's
log: a failover must not start a retry storm.
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
from srht_readonly.drill import Outcome, Recorder, verdicts
from srht_readonly.drill.scenarios import Expectation
from srht_readonly.drill.services import DrillEnvironment

from ._traffic import STOP_WAIT, Traffic

__all__ = ["CeleryTraffic"]

#: load -> (client loops, worker processes, pause between tasks in seconds)
LOADS = {"typical": (2, 2, 0.2), "excessive": (4, 3, 0.0)}
DELIVERIES = 32
TASK_TIMEOUT = 20.0
RETRY_LINE = r"webhooks\.async_request\[[^]]*\] retry: "


class CeleryTraffic(Traffic):
    """Runs Redis and a webhook worker for the drill's lifetime and queues deliveries to it."""

    name = "celery"

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine, webhook_url: str) -> None:
        threads, processes, pause = LOADS[env.load]
        super().__init__(threads=threads, pause=pause)
        directory = env.directory / "celery"
        self.redis = RedisServer(directory / "redis")
        stack.callback(self.redis.stop)
        self.redis.start()
        self.worker = CeleryWorker("integrations.webhooks.service", directory / "worker", name="srht-drill",
                                   queues="webhooks", concurrency=processes, env={
                                       "SRHT_WEBHOOKS_BROKER": self.redis.url(0),
                                       "SRHT_WEBHOOKS_BACKEND": self.redis.url(1),
                                       "SRHT_WEBHOOKS_DATABASE": env.database_url,
                                       "SRHT_WEBHOOKS_RECHECK": "0.5",
                                   })
        stack.callback(self.worker.stop)
        self.worker.start()
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
        started = time.monotonic()
        try:
            result = self.task.delay(self.url, body, {}, webhooks.TABLE, delivery)
        except Exception as exc:  # the broker is ours and local: queuing should not fail
            self.record("deliver", Outcome.ERROR, started, write=True, detail=f"could not queue: {exc!r}")
            return
        self._wait(result, started)

    def _wait(self, result: AsyncResult, started: float) -> None:
        give_up = None
        while not result.ready():
            now = time.monotonic()
            if now - started > TASK_TIMEOUT:
                self.record("deliver", Outcome.ERROR, started, write=True,
                            detail=f"no result after {TASK_TIMEOUT:g} s (state {result.state})")
                return
            if self.stopping:
                give_up = give_up or now + STOP_WAIT
                if now > give_up:
                    return  # queued moments before the end of the scenario: not judged
            time.sleep(0.02)
        outcome, detail = judge(result)
        self.record("deliver", outcome, started, write=True, detail=detail)
        result.forget()

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts)
        if scenario in ("readonly-failover", "primary-crash"):
            retried = self._retries["stop"] - self._retries["start"]
            checks.append(Expectation("celery: no delivery was retried (no retry storm)", retried == 0,
                                      f"{retried} retries in the worker's log"))
        if scenario == "readonly-failover":
            inside = verdicts.during(events, *verdicts.read_only_window(facts))
            wrong = [e for e in inside if e.outcome is not Outcome.EXPLAINED or "ReadOnlyError" not in e.detail]
            checks.append(Expectation("celery: deliveries in the read-only window failed cleanly with ReadOnlyError",
                                      bool(inside) and not wrong,
                                      f"{len(inside)} deliveries, {verdicts.sample(wrong, 'otherwise')}"))
        return checks


def judge(result: AsyncResult) -> tuple[Outcome, str]:
    """A finished task's outcome for the drill."""
    state = result.state
    if state == "SUCCESS":
        return Outcome.OK, f"receiver answered {result.result}"
    error = result.result
    if state == "FAILURE" and isinstance(error, ReadOnlyError | DatabaseUnavailable):
        return Outcome.EXPLAINED, f"FAILURE {type(error).__name__}: {error}"[:200]
    return Outcome.ERROR, f"{state}: {error!r}"[:200]

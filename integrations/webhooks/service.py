"""A service's webhook worker, configured from the environment (``celery -A`` loads this module).

A real service builds it from ``config.ini`` in ``<svc>srht/webhooks.py``; here::

    SRHT_WEBHOOKS_BROKER=redis://127.0.0.1:6379/0 \\
    SRHT_WEBHOOKS_DATABASE=postgresql://srht@127.0.0.1:16432/srht \\
    celery -A integrations.webhooks.service worker -Q webhooks --loglevel INFO

Optional: ``SRHT_WEBHOOKS_BACKEND`` (result backend URL), ``SRHT_WEBHOOKS_RECHECK`` (seconds
between probes while read-only), ``SRHT_WEBHOOKS_DEFER_DEADLINE`` (seconds) and
``SRHT_WEBHOOKS_DEFER_COUNTDOWN`` (``first,cap`` seconds) for the durable task;
``SRHT_WEBHOOKS_METRICS_PORT`` with ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, the
``metrics`` extra): the worker's metrics (``srht_readonly.metrics``, service ``webhooks``),
every pool process's added up, served by the main process on that loopback port.
"""

from __future__ import annotations

import os

from .worker import make_worker


def _countdown(value: str) -> tuple[float, float]:
    first, cap = (float(part) for part in value.split(","))
    return first, cap


app = make_worker(
    os.environ.get("SRHT_WEBHOOKS_BROKER", "redis://"),
    database_url=os.environ.get("SRHT_WEBHOOKS_DATABASE", "postgresql://srht@127.0.0.1:16432/srht"),
    backend=os.environ.get("SRHT_WEBHOOKS_BACKEND") or None,
    recheck=float(os.environ.get("SRHT_WEBHOOKS_RECHECK", "2")),
    defer_deadline=float(os.environ.get("SRHT_WEBHOOKS_DEFER_DEADLINE", "3600")),
    defer_countdown=_countdown(os.environ.get("SRHT_WEBHOOKS_DEFER_COUNTDOWN", "1,60")),
)

if os.environ.get("SRHT_WEBHOOKS_METRICS_PORT") and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from celery import signals

    from srht_readonly.metrics import ServiceMetrics, mark_process_dead, serve

    # Made before the pool forks: every pool process hears its own monitor and policies.
    ServiceMetrics("webhooks").watch(app.srht_readonly_monitor)

    @signals.worker_init.connect(weak=False)
    def _serve_metrics(**_: object) -> None:  # the main process only
        serve(int(os.environ["SRHT_WEBHOOKS_METRICS_PORT"]))

    @signals.worker_process_shutdown.connect(weak=False)
    def _forget_live_gauges(pid: int | None = None, **_: object) -> None:
        mark_process_dead(pid or os.getpid())

"""A service's webhook worker, configured from the environment (``celery -A`` loads this module).

A real service builds it from ``config.ini`` in ``<svc>srht/webhooks.py``; here::

    SRHT_WEBHOOKS_BROKER=redis://127.0.0.1:6379/0 \\
    SRHT_WEBHOOKS_DATABASE=postgresql://srht@127.0.0.1:16432/srht \\
    celery -A integrations.webhooks.service worker -Q webhooks --loglevel INFO

Optional: ``SRHT_WEBHOOKS_BACKEND`` (result backend URL), ``SRHT_WEBHOOKS_RECHECK`` (seconds
between probes while read-only), ``SRHT_WEBHOOKS_DEFER_DEADLINE`` (seconds) and
``SRHT_WEBHOOKS_DEFER_COUNTDOWN`` (``first,cap`` seconds) for the durable task.
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

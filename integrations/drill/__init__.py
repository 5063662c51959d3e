"""The stand-in services of ``integrations/`` as the drill's traffic (entry point ``local``).

``LocalServices(env)`` sets up, once per drill, everything the four services need on this
machine: the schemas (through ``env.database_url`` while it takes writes), the git.sr.ht web
front on a loopback port, sshd with the SSH pipeline and meta.sr.ht's stand-in, the build
runner, Redis and a ``celery worker`` process for webhook deliveries, and a webhook receiver.
Its ``sources`` (``web``, ``ssh``, ``builds``, ``celery``; see each module) send traffic that
mimics each service's users during every scenario and judge what they saw; ``close()`` stops
everything, and so does a failure half-way through the constructor.

sshd needs root (it switches to the pushing user); PostgreSQL and PgBouncer are the lab's.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence

from integrations.webhooks.harness import WebhookReceiver
from integrations.webhooks.schema import connect
from srht_readonly.drill.runner import TrafficSource
from srht_readonly.drill.services import DrillEnvironment

from .builds import BuildTraffic
from .celery import CeleryTraffic
from .ssh import SshTraffic
from .web import WebTraffic

__all__ = ["BuildTraffic", "CeleryTraffic", "LocalServices", "SshTraffic", "WebTraffic"]

logger = logging.getLogger(__name__)

SERVICES = ("web", "ssh", "builds", "celery")


class LocalServices:
    """The drill's ``ServiceSet`` for the stand-ins, all running on this machine (``env.only``: some of them)."""

    def __init__(self, env: DrillEnvironment) -> None:
        self.env = env
        self._stack = contextlib.ExitStack()
        started = time.monotonic()
        try:
            chosen = env.only if env.only is not None else frozenset(SERVICES)
            unknown = sorted(chosen - set(SERVICES))
            if unknown:
                raise ValueError(f"no stand-in service called {', '.join(unknown)} (there are {', '.join(SERVICES)})")
            receiver = self._stack.enter_context(WebhookReceiver())
            engine = connect(env.database_url)
            sources: list[TrafficSource] = []
            try:
                if "web" in chosen:
                    self.web = WebTraffic(env, self._stack, engine)
                    sources.append(self.web)
                if "ssh" in chosen:
                    self.ssh = SshTraffic(env, self._stack, engine, receiver.url)
                    sources.append(self.ssh)
                if "builds" in chosen:
                    self.builds = BuildTraffic(env, self._stack, engine)
                    sources.append(self.builds)
                if "celery" in chosen:
                    self.celery = CeleryTraffic(env, self._stack, engine, receiver.url)
                    sources.append(self.celery)
            finally:
                engine.dispose()
        except BaseException:
            self._stack.close()
            raise
        self.sources: Sequence[TrafficSource] = sources
        logger.info("local services up in %.1f s: %s", time.monotonic() - started,
                    ", ".join(s.name for s in self.sources))

    def close(self) -> None:
        """Stop the traffic, then every server and process; safe to call twice."""
        self._stack.close()

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

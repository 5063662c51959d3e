"""Prometheus metrics of a service process (the ``metrics`` extra: ``pip install 'srht-readonly[metrics]'``).

::

    from srht_readonly.metrics import ServiceMetrics

    metrics = ServiceMetrics("git.sr.ht")
    metrics.watch(monitor)                       # read-only state, read-only periods, writable again
    monitor = ReadOnlyMonitor(probe=metrics.timed_probe(engine))   # probe latency (optional)

Metrics (docs/monitoring.md), every one labelled ``service``:

* ``srht_readonly_read_only{service,reason}``: 1 while this process's monitor is read-only, for
  the reason it gave (``error``, ``probe``, ``announcement``...), 0 for the other reasons seen.
  A monitor only re-checks when something asks it; so that an idle process (a Celery pool
  process that got no task since the promotion) does not show a stale 1, a watched monitor that
  turned read-only is asked every ``recheck`` seconds from a thread of its own process until it
  is writable again;
* ``srht_readonly_writes_total{service,policy,outcome}``: what the policies did with writes
  (``abort``/``refused``, ``drop``/``dropped``, ``retry``/``retried`` per wait and ``gave_up``,
  ``celery``/``failed``, ``deferred``, ``gave_up``);
* ``srht_readonly_retry_wait_seconds{service}`` (histogram): each wait of ``retry_until_writable``;
* ``srht_readonly_probe_seconds{service,result}`` (histogram): each probe of a watched monitor
  (``result``: ``writable``, ``read_only``, ``error``), or made through ``timed_probe``;
* ``srht_readonly_read_only_seconds{service}`` (histogram): how long each read-only period lasted;
* ``srht_readonly_writable_again_timestamp_seconds{service}``: when the monitor last found the
  database writable again after a read-only period. Minus the fleet exporter's
  ``srht_readonly_node_promoted_timestamp_seconds``, it is the seconds from promotion to writable
  again (the recording rule ``srht_readonly:promotion_to_writable_seconds`` in contrib/prometheus).

Multi-process servers (gunicorn, Celery's prefork pool): set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory before the server starts; ``exposition()`` (and so ``flask.metrics_endpoint``
and ``serve``) then adds up every process's files. Gauges keep the live processes' maximum.

This module is the only one of the application side that imports ``prometheus_client``; the
core never imports it. It hears the policies through ``srht_readonly._outcomes`` and the
monitor through its listeners (``add_listener``).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from . import _outcomes
from .monitor import MonitorEvent, ReadOnlyMonitor

__all__ = ["CONTENT_TYPE_LATEST", "REGISTRY", "ServiceMetrics", "exposition", "mark_process_dead", "serve"]

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
PERIOD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)

_OUTCOME_FAILURE = "failure"
_TIMED = "_srht_readonly_timed_probe"


class _Family:
    """The metric objects, made once per registry (a registry refuses a name twice)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.read_only = Gauge("srht_readonly_read_only", "1 while the process's monitor says read-only, per reason",
                               ["service", "reason"], registry=registry, multiprocess_mode="livemax")
        self.writes = Counter("srht_readonly_writes", "Writes the read-only policies refused, dropped, deferred or "
                              "retried", ["service", "policy", "outcome"], registry=registry)
        self.retry_wait = Histogram("srht_readonly_retry_wait_seconds", "Each wait of retry_until_writable",
                                    ["service"], buckets=WAIT_BUCKETS, registry=registry)
        self.probe = Histogram("srht_readonly_probe_seconds", "Read-only probes of the database",
                               ["service", "result"], buckets=PROBE_BUCKETS, registry=registry)
        self.period = Histogram("srht_readonly_read_only_seconds", "How long each read-only period lasted",
                                ["service"], buckets=PERIOD_BUCKETS, registry=registry)
        self.writable_again = Gauge("srht_readonly_writable_again_timestamp_seconds",
                                    "When the monitor found the database writable again after a read-only period",
                                    ["service"], registry=registry, multiprocess_mode="livemax")


_families: dict[int, _Family] = {}
_families_lock = threading.Lock()


def _family(registry: CollectorRegistry) -> _Family:
    with _families_lock:
        if id(registry) not in _families:
            _families[id(registry)] = _Family(registry)
        return _families[id(registry)]


class ServiceMetrics:
    """The metrics of one service in this process. ``registry``: prometheus_client's default one unless given."""

    def __init__(self, service: str, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.service = service
        self.registry = registry
        self.family = _family(registry)
        self._reasons: set[str] = set()
        self._read_only_since: float | None = None
        self._lock = threading.Lock()
        self._monitors: list[tuple[ReadOnlyMonitor, Callable[[MonitorEvent], None]]] = []
        self._refreshing: dict[int, int] = {}  # id(monitor) -> pid of the process whose thread asks it
        self._closed = threading.Event()
        _outcomes.add_observer(self._outcome)

    def close(self) -> None:
        """Stop hearing the policies and the watched monitors."""
        _outcomes.remove_observer(self._outcome)
        self._closed.set()
        for monitor, listener in self._monitors:
            monitor.remove_listener(listener)
            monitor.remove_probe_observer(self._probed)
        self._monitors.clear()

    # -- the monitor ----------------------------------------------------------------------------

    def watch(self, monitor: ReadOnlyMonitor) -> ReadOnlyMonitor:
        """Follow ``monitor``'s state (its listeners); returns it."""
        listener = functools.partial(self._event, monitor=monitor)
        monitor.add_listener(listener)
        self._monitors.append((monitor, listener))
        if not getattr(monitor._probe, _TIMED, False):  # a timed_probe already records each probe
            monitor.add_probe_observer(self._probed)
        state = monitor.state
        self._set(state.read_only, _text(state.reason), state.since)
        return monitor

    def _event(self, event: MonitorEvent, monitor: ReadOnlyMonitor | None = None) -> None:
        if event["event"] in ("read-only", "writable"):
            self._set(bool(event["read_only"]), _text(event["reason"]), float(event["since"]))
            if event["read_only"] and monitor is not None:
                self._keep_asking(monitor)

    def _probed(self, seconds: float, result: str) -> None:
        self.family.probe.labels(self.service, result).observe(seconds)

    def _keep_asking(self, monitor: ReadOnlyMonitor) -> None:
        """Ask ``monitor`` every ``recheck`` seconds, from a thread of this process, until it is writable."""
        pid = os.getpid()
        with self._lock:
            if self._refreshing.get(id(monitor)) == pid:
                return  # this process already has one (a forked child's entry is its parent's)
            self._refreshing[id(monitor)] = pid

        def ask() -> None:
            try:
                while not self._closed.wait(monitor.recheck):
                    if not monitor.read_only:  # re-checks when due, exactly as a request would
                        return
            except Exception:  # never let metrics take a process down
                logger.exception("re-checking the read-only monitor for the metrics failed")
            finally:
                with self._lock:
                    if self._refreshing.get(id(monitor)) == pid:
                        del self._refreshing[id(monitor)]

        threading.Thread(target=ask, name="srht-readonly-metrics-recheck", daemon=True).start()

    def _set(self, read_only: bool, reason: str, since: float) -> None:
        with self._lock:
            self._reasons.add(reason)
            for seen in self._reasons:
                self.family.read_only.labels(self.service, seen).set(float(read_only and seen == reason))
            if read_only and self._read_only_since is None:
                self._read_only_since = since
            elif not read_only and self._read_only_since is not None:
                self.family.period.labels(self.service).observe(max(0.0, since - self._read_only_since))
                self.family.writable_again.labels(self.service).set(since)
                self._read_only_since = None

    # -- the policies ---------------------------------------------------------------------------

    def _outcome(self, policy: str, outcome: str, fields: dict[str, Any]) -> None:
        self.family.writes.labels(self.service, policy, outcome).inc()
        if policy == "retry" and outcome == "retried":
            self.family.retry_wait.labels(self.service).observe(float(fields.get("wait", 0.0)))

    # -- probes ---------------------------------------------------------------------------------

    def timed_probe(self, probe: Any, *, timeout: float = 2.0) -> Callable[[], bool]:
        """A probe for ``ReadOnlyMonitor(probe=...)`` that records its latency.

        ``probe`` is a callable returning whether the database is read-only, or a SQLAlchemy
        engine (probed as the monitor does by itself, bounded by ``timeout`` seconds).
        """
        if callable(probe):
            inner: Callable[[], bool] = probe
        else:
            from ._probe import probe_engine

            engine = probe

            def inner() -> bool:
                return bool(probe_engine(engine, timeout=timeout))

        histogram = self.family.probe

        def timed() -> bool:
            started = time.perf_counter()
            try:
                answer = bool(inner())
            except BaseException:
                histogram.labels(self.service, "error").observe(time.perf_counter() - started)
                raise
            histogram.labels(self.service, "read_only" if answer else "writable").observe(
                time.perf_counter() - started)
            return answer

        setattr(timed, _TIMED, True)
        return timed


def _text(reason: object) -> str:
    return str(getattr(reason, "value", reason))


def exposition(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The metrics as Prometheus text and its content type; every process's with ``PROMETHEUS_MULTIPROC_DIR``."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY) -> Any:
    """Serve ``/metrics`` from a thread of this process (a Celery worker's main process, say).

    Returns the HTTP server (``server_address``; ``shutdown()`` stops it). Port 0: a free one.
    """
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    server, _ = start_http_server(port, addr, registry)
    return server


def mark_process_dead(pid: int | None = None) -> None:
    """In multi-process mode, drop a finished worker's live gauges (gunicorn's ``child_exit`` hook)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid() if pid is None else pid)

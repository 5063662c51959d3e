"""The fleet exporter: ``status`` as Prometheus metrics (``srht-readonly exporter``, the ``metrics`` extra).

A thread observes the fleet every ``interval`` seconds exactly as ``status`` does (``collect``)
and times a tiny write on the primary; each scrape of ``/metrics`` renders the latest
observation (a scrape never waits for the fleet). Metrics (docs/monitoring.md):

* ``srht_readonly_node_up{node}``, ``srht_readonly_node_is_primary{node}``,
  ``srht_readonly_node_timeline{node}``, ``srht_readonly_replication_lag_bytes{node}``,
  ``srht_readonly_replication_lag_seconds{node}``, ``srht_readonly_standby_streaming{node}``,
  ``srht_readonly_slot_retained_bytes{node,slot}``, ``srht_readonly_slot_active{node,slot}``;
* ``srht_readonly_pgbouncer_up{pgbouncer}``, ``srht_readonly_pgbouncer_paused{pgbouncer}``,
  ``srht_readonly_pgbouncer_target{pgbouncer,node}`` (1 for the node it points at),
  ``srht_readonly_pgbouncer_server_login_retry_seconds{pgbouncer}``,
  ``srht_readonly_pgbouncer_resumed_by_timer{pgbouncer}``;
* ``srht_readonly_primary_commit_seconds``: ``SELECT txid_current()`` and its ``COMMIT``, timed
  on a connection kept open to the primary, the median of three (``sql.commit_seconds``, which
  ``status``'s slow-primary check uses too). ``txid_current()`` assigns a transaction id, so the
  commit writes a WAL commit record and waits for it to be flushed (and for synchronous standbys,
  if any): the latency a service's smallest write meets. Absent while there is no single primary;
* ``srht_readonly_node_promoted_timestamp_seconds{node}``: when the primary's timeline began
  (its ``.history`` file's modification time; absent on timeline 1);
* ``srht_readonly_announcement_in_effect``, ``srht_readonly_announcement_ends_timestamp_seconds``
  (the service hosts' maintenance announcement, ``[service NAME]``);
* ``srht_readonly_backup_streaming``, ``srht_readonly_backup_earliest_timestamp_seconds``,
  ``srht_readonly_backup_latest_timestamp_seconds``, ``srht_readonly_backup_last_success_timestamp_seconds``,
  ``srht_readonly_backup_window_seconds`` (with a ``[backup]`` engine: the recoverable window, docs/past.md);
* ``srht_readonly_status_problems{severity}``; ``srht_readonly_observation_timestamp_seconds``,
  ``srht_readonly_observation_duration_seconds``, ``srht_readonly_observation_success``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg2
from prometheus_client import start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from .cluster import Cluster
from .fleet import seconds_setting
from .sql import COMMIT_TIMEOUT_MS, commit_seconds
from .status import Status, collect

logger = logging.getLogger(__name__)

PREFIX = "srht_readonly_"


class FleetExporter(Collector):
    """Observes ``cluster`` every ``interval`` seconds in a thread; a ``Collector`` of the latest observation."""

    def __init__(self, cluster: Cluster, *, interval: float = 15.0) -> None:
        self.cluster = cluster
        self.interval = interval
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.status: Status | None = None
        self.commit_seconds: float | None = None
        self.promoted_at: dict[str, float] = {}
        self.observed_at = 0.0
        self.duration = 0.0
        self.success = False
        self._conn: Any = None
        self._conn_node: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    def __enter__(self) -> FleetExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- observing -----------------------------------------------------------------------------

    def observe(self) -> None:
        """One observation: ``status``, the primary's commit latency and promotion time."""
        started = time.monotonic()
        try:
            status = collect(self.cluster)
            primaries = [n for n in status.nodes if n.role == "primary"]
            commit, promoted = (self._time_commit(primaries[0].name, primaries[0].timeline)
                                if len(primaries) == 1 else (None, {}))
            self.status, self.commit_seconds, self.promoted_at = status, commit, promoted
            self.success = True
        except Exception:  # noqa: BLE001 - an exporter keeps serving; the failure is a metric
            logger.exception("observing the fleet failed")
            self.success = False
        self.duration = time.monotonic() - started
        self.observed_at = time.time()
        self._ready.set()

    def _time_commit(self, node: str, timeline: int | None) -> tuple[float | None, dict[str, float]]:
        try:
            if self._conn is None or self._conn.closed or self._conn_node != node:
                self._disconnect()
                self._conn = psycopg2.connect(self.cluster.node(node).dsn, connect_timeout=5,
                                              application_name="srht-readonly exporter",
                                              options=f"-c statement_timeout={COMMIT_TIMEOUT_MS}")
                self._conn_node = node
            seconds = commit_seconds(self._conn, pause_first=True)
        except psycopg2.Error as exc:
            logger.warning("timing a commit on %s failed: %s", node, str(exc).strip())
            self._disconnect()
            return None, {}
        return seconds, self._promoted(node, timeline)

    def _promoted(self, node: str, timeline: int | None) -> dict[str, float]:
        """When ``node``'s timeline began: its history file's mtime (needs pg_read_server_files or superuser)."""
        if not timeline or timeline <= 1:
            return {}
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT extract(epoch FROM (pg_stat_file(%s, true)).modification)",
                            (f"pg_wal/{timeline:08X}.history",))
                row = cur.fetchone()
            self._conn.rollback()
        except psycopg2.Error as exc:
            logger.debug("reading the timeline history's time on %s failed: %s", node, str(exc).strip())
            with contextlib.suppress(psycopg2.Error):
                self._conn.rollback()
            return {}
        return {node: float(row[0])} if row and row[0] is not None else {}

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn, self._conn_node = None, None

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.observe()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    # --- serving -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start observing in a thread; returns after the first observation."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="srht-readonly-exporter", daemon=True)
            self._thread.start()
        self._ready.wait()

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Start observing and serve ``/metrics`` on ``host:port`` (port 0: a free one); the address served."""
        self.start()
        self._server, _ = start_http_server(port, host, self.registry)
        address = self._server.server_address
        return str(address[0]), int(address[1])

    def wait(self) -> None:
        """Block until ``close()`` (or a signal in the main thread)."""
        while not self._stop.wait(1.0):
            pass

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._disconnect()

    # --- the Collector -------------------------------------------------------------------------

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The latest observation as metric families (called by each scrape)."""
        yield _gauge("observation_success", "1 if the last observation of the fleet ran", value=self.success)
        yield _gauge("observation_timestamp_seconds", "When the fleet was last observed", value=self.observed_at)
        yield _gauge("observation_duration_seconds", "How long the last observation took", value=self.duration)
        status = self.status
        if status is None:
            return
        up = _gauge("node_up", "1 if the node answers", ["node"])
        primary = _gauge("node_is_primary", "1 if the node is a primary (not in recovery)", ["node"])
        timeline = _gauge("node_timeline", "The node's timeline", ["node"])
        lag = _gauge("replication_lag_bytes", "WAL the standby has not replayed, bytes behind the primary", ["node"])
        lag_s = _gauge("replication_lag_seconds", "Seconds the standby's replay is behind", ["node"])
        streaming = _gauge("standby_streaming", "1 if the standby's WAL receiver is streaming", ["node"])
        slot_bytes = _gauge("slot_retained_bytes", "WAL a replication slot holds back on its node", ["node", "slot"])
        slot_active = _gauge("slot_active", "1 if the slot has a consumer", ["node", "slot"])
        promoted = _gauge("node_promoted_timestamp_seconds", "When the primary's timeline began (promotion)",
                          ["node"])
        for n in status.nodes:
            up.add_metric([n.name], float(n.role != "down"))
            primary.add_metric([n.name], float(n.role == "primary"))
            if n.timeline is not None:
                timeline.add_metric([n.name], n.timeline)
            if n.role == "standby":
                streaming.add_metric([n.name], float(n.receiver_status == "streaming"))
                if n.lag_bytes is not None:
                    lag.add_metric([n.name], n.lag_bytes)
                if n.lag_seconds is not None:
                    lag_s.add_metric([n.name], n.lag_seconds)
            for s in n.slots:
                slot_active.add_metric([n.name, s.name], float(s.active))
                if s.retained_bytes is not None:
                    slot_bytes.add_metric([n.name, s.name], s.retained_bytes)
            if n.name in self.promoted_at:
                promoted.add_metric([n.name], self.promoted_at[n.name])
        yield from (up, primary, timeline, lag, lag_s, streaming, slot_bytes, slot_active, promoted)

        b_up = _gauge("pgbouncer_up", "1 if the PgBouncer's host and console answer", ["pgbouncer"])
        paused = _gauge("pgbouncer_paused", "1 if the PgBouncer (or a followed database) is paused", ["pgbouncer"])
        target = _gauge("pgbouncer_target", "1 for the node the PgBouncer's followed entries point at",
                        ["pgbouncer", "node"])
        retry = _gauge("pgbouncer_server_login_retry_seconds", "The PgBouncer's server_login_retry", ["pgbouncer"])
        timer = _gauge("pgbouncer_resumed_by_timer", "1 if its dead-man timer resumed it (until the next "
                                                     "procedure finishes)", ["pgbouncer"])
        for b in status.pgbouncers:
            b_up.add_metric([b.name], float(b.reachable))
            if not b.reachable:
                continue
            paused.add_metric([b.name], float(b.paused))
            target.add_metric([b.name, b.target or "unknown"], 1.0)
            retry.add_metric([b.name], seconds_setting(b.settings.get("server_login_retry")))
            timer.add_metric([b.name], float(bool(b.resumed_by_timer)))
        yield from (b_up, paused, target, retry, timer)

        if self.commit_seconds is not None:
            yield _gauge("primary_commit_seconds", "SELECT txid_current() and its COMMIT, timed on the primary",
                         value=self.commit_seconds)
        announcement = status.announcement
        yield _gauge("announcement_in_effect", "1 while the service hosts' maintenance announcement is in effect",
                     value=bool(announcement and announcement["in_effect"]))
        if announcement and announcement["ends"]:
            yield _gauge("announcement_ends_timestamp_seconds", "When the announced maintenance window ends",
                         value=datetime.fromisoformat(announcement["ends"]).timestamp())
        yield from _backup_gauges(status.past)
        problems = _gauge("status_problems", "status's problems by severity", ["severity"])
        for severity in ("critical", "warning", "info"):
            problems.add_metric([severity], sum(p.severity == severity for p in status.problems))
        yield problems


def _backup_gauges(past: dict[str, Any]) -> Iterator[GaugeMetricFamily]:
    """The recoverable window of ``[backup]``'s engine, when there is one (``status``'s ``past``)."""
    if past.get("engine") is None or "error" in past:
        return
    yield _gauge("backup_streaming", "1 while WAL streams to the backup engine", value=bool(past.get("streaming")))
    for key, name, doc in (("earliest", "backup_earliest_timestamp_seconds", "The earliest recoverable time"),
                           ("latest", "backup_latest_timestamp_seconds", "The latest recoverable time"),
                           ("last_success", "backup_last_success_timestamp_seconds",
                            "When the newest finished base backup ended")):
        if past.get(key):
            yield _gauge(name, doc, value=datetime.fromisoformat(past[key]).timestamp())
    if past.get("earliest") and past.get("latest"):
        yield _gauge("backup_window_seconds", "How far into the past the database can be opened",
                     value=datetime.fromisoformat(past["latest"]).timestamp()
                     - datetime.fromisoformat(past["earliest"]).timestamp())


def _gauge(name: str, documentation: str, labels: list[str] | None = None, *,
           value: float | None = None) -> GaugeMetricFamily:
    if labels is None:
        return GaugeMetricFamily(PREFIX + name, documentation, value=float(value or 0))
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)

"""The scenarios' steps carried out by the operations commands' own code, on any inventory.

The local drill writes an inventory for its lab and uses this class too, so a drill exercises
exactly what ``srht-readonly switchover``/``failover``/``promote``/``demote`` run in production.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from ..ops import replication, sql
from ..ops.cluster import Cluster
from ..ops.demote import check_demote, run_demote
from ..ops.errors import OpsError
from ..ops.failover import LOGIN_RETRY, check_failover, run_failover
from ..ops.fleet import Change, Fleet
from ..ops.observe import observe_nodes, primaries
from ..ops.past import list_past, open_past, stop_past
from ..ops.pgupgrade import foreign_column_options
from ..ops.promote import check_promote, run_promote
from ..ops.rolling import check_rolling, run_rolling
from ..ops.status import collect
from ..ops.switchover import check_switchover, run_switchover
from ..ops.upgrade import check_major_upgrade, run_major_upgrade
from .sabotage import with_setting

logger = logging.getLogger(__name__)


class InventoryProcedures:
    """``scenarios.Procedures`` over a ``Cluster``; roles are observed each time they are asked for.

    ``sabotage`` (``no-resume``, ``slow-login-retry``; see ``drill.sabotage``) breaks the
    switchover or the failover on purpose, to prove the drill catches it. ``major_bin`` is the
    new major's bindir for ``major_upgrade``; ``drop_column_options`` the non-stock column
    options it may remove (``True``: whatever it finds, for the throwaway lab only).
    """

    def __init__(self, cluster: Cluster, *, sabotage: str | None = None, major_bin: str | None = None,
                 drop_column_options: tuple[str, ...] | bool = (), app_dsn: str | None = None,
                 own_etcd: bool = False) -> None:
        self.cluster = cluster
        self.own_etcd = own_etcd  # the embedded lab: the drill may start an etcd of its own for the agents
        self.app_dsn = app_dsn  # where the services' data lives, through a PgBouncer (past-data's writes)
        self.sabotage = sabotage
        self.major_bin = major_bin
        self.drop_column_options = drop_column_options
        self._left_paused: Fleet | None = None

    def close(self) -> None:
        """Undo a sabotage's pause (the drill is over), so the clients held by it can end."""
        if self._left_paused is not None:
            self._left_paused.resume()
            self._left_paused.close()
            self._left_paused = None

    def primary(self) -> str:
        live = primaries(observe_nodes(self.cluster.inventory))
        if len(live) != 1:
            raise OpsError(f"expected one primary, found {len(live)}: {', '.join(live) or 'none'}")
        return live[0]

    def ready(self) -> None:
        """``OpsError`` unless a primary has a streaming standby and every PgBouncer points at it, not paused.

        Checked before each scenario, so one left half-done (a PgBouncer on the standby, paused)
        is reported where it happened instead of spoiling the scenarios after it.
        """
        primary, _ = self.primary(), self.standby()
        with Fleet(self.cluster) as fleet:
            fleet.open()
            fleet.require_all()
            wrong = {name: ("paused" if b.paused else f"points at {b.target or 'an unknown server'}")
                     for name, b in fleet.observe().items() if b.paused or b.target != primary}
        if wrong:
            raise OpsError(f"PgBouncers not ready on {primary}: " + "; ".join(f"{n} {w}" for n, w in wrong.items()))

    def standby(self) -> str:
        states = observe_nodes(self.cluster.inventory)
        live = primaries(states)
        streaming = [n for n, s in states.items() if s.role == "standby" and s.receiver_status == "streaming"
                     and (not live or s.upstream == live[0])]
        if not streaming:
            raise OpsError("no standby streams from the primary; the drill needs a healthy pair "
                           "(srht-readonly status shows what is wrong)")
        return streaming[0]

    def switchover(self, to: str) -> dict[str, Any]:
        with Fleet(self.cluster) as fleet:
            result = run_switchover(self.cluster, fleet, check_switchover(self.cluster, fleet, to))
        if self.sabotage == "no-resume":  # as if the RESUME of one PgBouncer had never arrived
            self._left_paused = Fleet(self.cluster, list(self.cluster.inventory.pgbouncers)[:1])
            self._left_paused.open()
            self._left_paused.pause(timeout=10)
        return {"write_pause": round(result.write_pause, 3), "phases": result.phases,
                "timeline": [result.timeline_before, result.timeline_after]}

    def failover(self, to: str) -> None:
        with Fleet(self.cluster) as fleet:
            login_retry: float | None = LOGIN_RETRY
            if self.sabotage == "slow-login-retry":  # PgBouncer's default, left as it is by the failover
                fleet.open()
                fleet.write({n: Change(n, m.text, with_setting(m.text, "server_login_retry", "15"))
                             for n, m in fleet.members.items() if m.text is not None})
                login_retry = None
            run_failover(self.cluster, fleet, check_failover(self.cluster, fleet, to), login_retry=login_retry)

    def promote(self, node: str) -> None:
        run_promote(self.cluster, check_promote(self.cluster, node))

    def demote(self, node: str, primary: str) -> None:
        run_demote(self.cluster, check_demote(self.cluster, node, primary))

    def stop(self, node: str, mode: str = "fast") -> None:
        self.cluster.server(node).stop(mode)

    def start(self, node: str) -> None:
        self.cluster.server(node).start()

    def kill(self, node: str) -> None:
        self.cluster.server(node).kill()

    def receive_lsn(self, node: str) -> str | None:
        """What ``node`` (a standby) has received, or None if it does not answer."""
        try:
            (lsn,) = sql.query_one(self.cluster.node(node).dsn, "SELECT pg_last_wal_receive_lsn()::text")
        except OpsError:
            return None
        return str(lsn) if lsn else None

    def wait_caught_up(self, node: str, timeout: float = 60) -> float:
        """Wait until ``node`` streams and has replayed what the primary had written; seconds waited."""
        started = time.monotonic()
        dsn = self.cluster.node(node).dsn
        replication.wait_streaming(dsn, timeout=timeout)
        replication.wait_caught_up(self.cluster.node(self.primary()).dsn, dsn, timeout=timeout)
        return time.monotonic() - started

    def rolling(self, kind: str, node: str, *, every: bool) -> dict[str, Any]:
        """``upgrade --minor NODE`` (same binaries) or ``upgrade --host NODE --run 'sleep 1'``."""
        with Fleet(self.cluster) as fleet:
            plan = check_rolling(self.cluster, fleet, node, kind=kind, every=every,
                                 command="sleep 1" if kind == "host" else None)
            result = run_rolling(self.cluster, fleet, plan)
        return {"switchovers": result.switchovers, "per_node_seconds": result.per_node_seconds}

    def major_upgrade(self, window: Callable[[str], None]) -> dict[str, Any]:
        """``upgrade --major --to-bin major_bin``; ``window`` is told when the fleet turns read-only and back."""
        if not self.major_bin:
            raise OpsError("no new major's bindir for the major-upgrade scenario ([drill] major-to-bin)")
        drop = self.drop_column_options
        if drop is True:
            drop = tuple(foreign_column_options(self.cluster.node(self.primary()).dsn))
        with Fleet(self.cluster) as fleet:
            plan = check_major_upgrade(self.cluster, fleet, self.major_bin, drop_column_options=tuple(drop or ()))
            result = run_major_upgrade(self.cluster, fleet, plan, window=window)
        return {"from": result.old_major, "to": result.new_major, "read_only_seconds": result.read_only_seconds,
                "phases": result.phases, "dropped_column_options": sorted(plan.drop_column_options)}

    def versions(self) -> dict[str, dict[str, Any]]:
        """Each node's server version and role, and whether a standby streams."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.cluster.inventory.nodes:
            try:
                version, in_recovery = sql.query_one(self.cluster.node(name).dsn,
                                                     "SELECT current_setting('server_version'), pg_is_in_recovery()")
                streaming = bool(in_recovery) and bool(sql.query(
                    self.cluster.node(name).dsn, "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'"))
                out[name] = {"version": str(version), "role": "standby" if in_recovery else "primary",
                             "streaming": streaming}
            except OpsError as exc:
                out[name] = {"version": None, "role": "down", "error": str(exc)}
        return out

    # --- the agents (unattended-crash, unattended-promote) ----------------------------------

    @contextlib.contextmanager
    def agents(self, *, auto_promote: float | None = None) -> Iterator[Any]:
        """An ``srht-readonly agent`` process beside every PgBouncer of the inventory while the block runs
        (``testing.agents.Agents``: ``wait_for``, ``lines``), each once it expects the primary; all
        stopped at the end, whatever happened.

        ``auto_promote``: the agents run with ``--auto-promote AFTER``, which needs ``[etcd]`` and ``[agent]``.
        On the embedded lab (``own_etcd``) the drill provides both (``_promoting_inventory``).
        """
        from ..testing.agents import Agents

        directory = Path(tempfile.mkdtemp(prefix="srht-drill-agents-"))
        env = dict(os.environ)
        if self.cluster.ssh_config:
            env["SRHT_READONLY_SSH_CONFIG"] = str(self.cluster.ssh_config)
        try:
            with contextlib.ExitStack() as provided:
                inventory, args = Path(self.cluster.inventory.path), []
                if auto_promote is not None:
                    inventory = self._promoting_inventory(directory, provided)
                    args = ["--auto-promote", f"{auto_promote:g}"]
                running = Agents(inventory, directory, *args, env=env)
                try:
                    running.wait_for("expect:", timeout=30)
                    yield running
                except BaseException:  # the scenario's own error (or Ctrl-C) is what the report must show
                    try:
                        running.stop()
                    except AssertionError as exc:
                        logger.warning("stopping the agents after a failure: %s", exc)
                    raise
                running.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _promoting_inventory(self, directory: Path, stack: contextlib.ExitStack) -> Path:
        """The inventory ``agent --auto-promote`` runs with, on the embedded lab: a copy of the lab's with a
        one-member etcd (stopped with ``stack``) and the lab's fence. Against an inventory the drill holds
        the fleet lock the whole time, and an automatic promotion waits while an operator's command does."""
        if not self.own_etcd:
            raise OpsError("the agents' automatic promotion is drilled on the embedded lab only: against an "
                           "inventory the drill holds the fleet lock, which --auto-promote waits for")
        from ..testing.agents import write_fence
        from ..testing.etcd import EtcdCluster

        etcd = stack.enter_context(EtcdCluster(directory / "etcd"))
        fence = write_fence(directory / "fence")
        path = directory / "inventory.ini"
        lab = Path(self.cluster.inventory.path).read_text()
        path.write_text(f"{lab}\n[etcd]\nendpoints = {', '.join(etcd.endpoints)}\n\n[agent]\nfence = {fence}\n")
        return path

    # --- soft outage -------------------------------------------------------------------------

    def throttle(self, node: str) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """``node``'s postmaster and every process under it in a cgroup of their own (CPU quota, write
        throttling: ``srht_readonly.testing.throttle``) while the block runs; what was applied.

        Only for a node on this machine (no ``ssh`` in its section: the lab's): ``OpsError`` otherwise,
        and ``ThrottleUnavailable`` naming what is missing where cgroups v1 cannot be used.
        """
        spec = self.cluster.inventory.node(node)
        if spec.ssh:
            raise OpsError(f"cannot throttle {node}: it runs on {spec.ssh} (over ssh), and the soft-outage scenario "
                           "throttles processes with cgroups on this machine only")
        from ..testing.throttle import throttle

        server = self.cluster.server(node)
        pid = server.postmaster_pid()
        if pid is None:
            raise OpsError(f"cannot throttle {node}: no postmaster.pid in {server.data}")

        @contextlib.contextmanager
        def applied() -> Iterator[dict[str, Any]]:
            with throttle(pid, server.data) as done:
                yield done.as_dict()
        return applied()

    @contextlib.contextmanager
    def timed_commits(self, node: str) -> Iterator[Callable[[], float]]:
        """A function timing one tiny commit on ``node`` (``sql.commit_seconds``) on a connection kept open until
        the block ends (``OpsError`` when it fails; the next call connects again)."""
        conn: Any = None

        def one() -> float:
            nonlocal conn
            try:
                if conn is None or conn.closed:
                    conn = psycopg2.connect(self.cluster.node(node).dsn, connect_timeout=5,
                                            application_name="srht-readonly drill",
                                            options=f"-c statement_timeout={sql.COMMIT_TIMEOUT_MS}")
                return sql.commit_seconds(conn, tries=1)
            except psycopg2.Error as exc:
                with contextlib.suppress(psycopg2.Error):
                    if conn is not None:
                        conn.close()
                conn = None
                raise OpsError(f"timing a commit on {node} failed: {str(exc).strip()}") from exc
        try:
            yield one
        finally:
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()

    def observe_slow_primary(self) -> dict[str, Any]:
        """What ``status`` (``collect``: its slow-primary problems and commit time) and one observation of the
        fleet exporter (its ``srht_readonly_primary_commit_seconds``, as a scrape renders it) say now, both
        at once.

        Both look at the inventory without its ``[backup]``: Barman's recoverable window is not what is
        judged here, and its commands, which query the primary, took 14 s before the throttle and 31 s
        during it in a drill on 2 busy cores.
        """
        out: dict[str, Any] = {"status": {}, "exporter": {}}
        inventory = self.cluster.inventory
        threshold = inventory.status.slow_commit
        cluster = self.cluster if inventory.backup is None else \
            Cluster(dataclasses.replace(inventory, backup=None), ssh_config=self.cluster.ssh_config)

        def status() -> None:
            try:
                st = collect(cluster)
            except Exception as exc:  # noqa: BLE001 - reported, judged by the verdict
                out["status"] = {"error": f"{type(exc).__name__}: {exc}"}
                return
            out["status"] = {"commit_seconds": st.commit_seconds,
                             "slow": [f"{p.subject}: {p.message}" for p in st.problems if "a tiny commit" in p.message]}

        def exporter() -> None:
            try:
                from prometheus_client import generate_latest
                from prometheus_client.parser import text_string_to_metric_families

                from ..ops.exporter import PREFIX, FleetExporter
                with FleetExporter(cluster) as ex:
                    ex.observe()
                    text = generate_latest(ex.registry).decode()
                value = next((s.value for f in text_string_to_metric_families(text) for s in f.samples
                              if s.name == PREFIX + "primary_commit_seconds"), None)
                out["exporter"] = {"primary_commit_seconds": value, "threshold": threshold}
            except Exception as exc:  # noqa: BLE001 - the metrics extra missing, the primary gone: judged
                out["exporter"] = {"error": f"{type(exc).__name__}: {exc}", "threshold": threshold}

        threads = [threading.Thread(target=f, name=f"drill-{f.__name__}") for f in (status, exporter)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if cluster is not self.cluster:
            cluster.close()
        return out

    # --- past data ---------------------------------------------------------------------------

    #: The numbered rows of the past-data scenario: burst 1 inserts 1-100 and deletes 1-10; burst 2
    #: inserts 101-200 and deletes 11-20. At a time between the two, exactly 11-100 exist.
    PAST_TABLE = "drill_past"

    def numbered_burst(self, burst: int) -> None:
        """Through the first PgBouncer, as the services write: one acknowledged statement at a time."""
        dsn = self._app_dsn()
        if burst == 1:
            sql.execute(dsn, f"DROP TABLE IF EXISTS {self.PAST_TABLE}")
            sql.execute(dsn, f"CREATE TABLE {self.PAST_TABLE} (n int PRIMARY KEY)")
        base = (burst - 1) * 100
        with sql.connect(dsn) as conn, conn.cursor() as cur:
            for n in range(base + 1, base + 101):
                cur.execute(f"INSERT INTO {self.PAST_TABLE} VALUES (%s)", (n,))
            for n in range((burst - 1) * 10 + 1, burst * 10 + 1):
                cur.execute(f"DELETE FROM {self.PAST_TABLE} WHERE n = %s", (n,))

    def clock(self) -> str:
        (now,) = sql.query_one(self.cluster.node(self.primary()).dsn, "SELECT clock_timestamp()")
        return str(now.isoformat())

    def open_past(self, at: str) -> dict[str, Any]:
        """``past --at``; what it holds against what was committed by then; then ``past --stop``."""
        when = dt.datetime.fromisoformat(at)
        instance = open_past(self.cluster, at=when)
        try:
            dsn = instance.dsn.replace("dbname=postgres", f"dbname={self._app_db()}")
            rows = {r[0] for r in sql.query(dsn, f"SELECT n FROM {self.PAST_TABLE}")}
            later = sql.query_one(dsn, "SELECT count(*) FROM drill_ledger WHERE at > %s", (when,))[0] \
                if sql.query(dsn, "SELECT to_regclass('drill_ledger')")[0][0] else 0
        finally:
            stop_past(self.cluster, [instance.id])
        expected = set(range(11, 101))
        return {"at": at, "recovered_to": instance.recovered_to, "seconds": instance.seconds,
                "rows": len(rows), "missing": sorted(expected - rows)[:20], "extra": sorted(rows - expected)[:20],
                "ledger_rows_begun_after_t": int(later),
                "gone": all(i.id != instance.id for i in list_past(self.cluster))}

    def _app_db(self) -> str:
        return str(psycopg2.extensions.parse_dsn(self._app_dsn()).get("dbname", "postgres"))

    def _app_dsn(self) -> str:
        if self.app_dsn is None:
            raise OpsError("the past-data scenario needs the services' database (app_dsn)")
        return self.app_dsn

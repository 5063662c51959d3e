"""The scenarios' steps carried out by the operations commands' own code, on any inventory.

The local drill writes an inventory for its lab and uses this class too, so a drill exercises
exactly what ``srht-readonly switchover``/``failover``/``promote``/``demote`` run in production.
"""

from __future__ import annotations

import time
from typing import Any

from ..ops import replication, sql
from ..ops.cluster import Cluster
from ..ops.demote import check_demote, run_demote
from ..ops.errors import OpsError
from ..ops.failover import LOGIN_RETRY, check_failover, run_failover
from ..ops.fleet import Change, Fleet
from ..ops.observe import observe_nodes, primaries
from ..ops.promote import check_promote, run_promote
from ..ops.switchover import check_switchover, run_switchover
from .sabotage import with_setting


class InventoryProcedures:
    """``scenarios.Procedures`` over a ``Cluster``; roles are observed each time they are asked for.

    ``sabotage`` (``no-resume``, ``slow-login-retry``; see ``drill.sabotage``) breaks the
    switchover or the failover on purpose, to prove the drill catches it.
    """

    def __init__(self, cluster: Cluster, *, sabotage: str | None = None) -> None:
        self.cluster = cluster
        self.sabotage = sabotage
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

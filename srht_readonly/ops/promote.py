"""The plan's "Standby promotion procedure": make a standby the primary, with repmgr's safety checks.

``check_promote`` refuses (``Refused``, nothing changed) when the node is not a standby, when
another node is still a writable primary (split brain) unless forced, or when the node has not
replayed everything it received. ``run_promote`` then promotes, verifies that the timeline went
up, and checkpoints (so ``pg_rewind`` and base backups see the new timeline).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import sql
from .cluster import Cluster
from .errors import OpsError, Refused, Timeout
from .fleet import Fleet
from .observe import NodeState, observe_nodes, primaries

logger = logging.getLogger(__name__)


@dataclass
class PromotePlan:
    """What ``check_promote`` found: the node, the others' roles, and warnings for the operator."""

    node: str
    timeline: int | None
    receive_lsn: str | None
    replay_lsn: str | None
    others: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def steps(self) -> list[str]:
        return [
            f"promote {self.node}: SELECT pg_promote() (timeline {self.timeline} -> {(self.timeline or 0) + 1})",
            f"verify {self.node} left recovery and its timeline went up",
            f"CHECKPOINT on {self.node} (so pg_rewind and base backups see the new timeline)",
        ]

    def title(self) -> str:
        return f"promote {self.node}"


@dataclass
class PromoteResult:
    """What the promotion did."""

    node: str
    timeline_before: int
    timeline_after: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        return (f"{self.node} is the primary: timeline {self.timeline_before} -> {self.timeline_after} in "
                f"{self.seconds:.3f} s; CHECKPOINT done")


def check_promote(cluster: Cluster, node: str, *, force: bool = False, replay_timeout: float = 10) -> PromotePlan:
    """Refuse unless promoting ``node`` is safe; returns the plan."""
    cluster.node(node)
    states = observe_nodes(cluster.inventory)
    me = states[node]
    if me.role == "down":
        raise Refused(f"{node} does not answer ({me.error}); start it, or promote another standby")
    if me.role == "primary":
        raise Refused(f"{node} is already a primary (timeline {me.timeline}); nothing to do")
    others = {name: s.role for name, s in states.items() if name != node}
    warnings = []
    live = [p for p in primaries(states) if p != node]
    if live and not force:
        raise Refused(
            f"{', '.join(live)} is a primary and accepts writes; promoting {node} now would make two primaries "
            f"(split brain) and writes to either would be lost to the other. Stop {live[0]} first, or use "
            f"`srht-readonly switchover --to {node}` for a planned change; pass --force only if {live[0]} is cut "
            f"off from every client"
        )
    if live:
        warnings.append(f"--force: {', '.join(live)} is still a primary; make sure no client can reach it")
    # Unreachable is not stopped: an old primary that runs may still take writes from its clients.
    unfenced = [name for name, s in states.items() if name != node and s.role == "down"
                and cluster.server(name).is_running()]
    if unfenced and not force:
        raise Refused(
            f"{', '.join(unfenced)} does not answer but its postmaster runs: it may still take writes, and "
            f"promoting {node} would make two primaries. Stop it first (srht-readonly can stop it: "
            f"it is the plan's 'shut off the master'), or pass --force once it is cut off from every client"
        )
    if unfenced:
        warnings.append(f"--force: {', '.join(unfenced)} runs but does not answer; make sure no client can reach it")
    warnings += _fleet_not_on(cluster, node)
    _wait_replayed(cluster, me, replay_timeout)
    return PromotePlan(node, me.timeline, me.receive_lsn, me.replay_lsn, others, warnings)


def _fleet_not_on(cluster: Cluster, node: str) -> list[str]:
    """Warnings when the PgBouncers do not all point at ``node`` (the plan's order: failover, then promote)."""
    try:
        with Fleet(cluster) as fleet:
            fleet.open()
            elsewhere = {name: b.target or "an unknown server" for name, b in fleet.observe().items()
                         if b.target != node}
            unreached = fleet.errors()
    except OpsError as exc:
        return [f"could not look at the PgBouncers: {exc}"]
    warnings = [f"could not look at PgBouncer {name}: {why}" for name, why in unreached.items()]
    if elsewhere:
        where = ", ".join(sorted(set(elsewhere.values())))
        if cluster.inventory.etcd is not None:
            warnings.append(f"PgBouncers {', '.join(elsewhere)} point at {where}, not {node}: once {node} is promoted "
                            f"the fleet's state in etcd names it for every PgBouncer and their agents repoint them "
                            f"(unless another node still answers as a primary); for one without a running agent, "
                            f"run `srht-readonly failover --to {node}`")
        else:
            warnings.append(f"PgBouncers {', '.join(elsewhere)} point at {where}, not {node}: their services will "
                            f"not use it; run `srht-readonly failover --to {node}`")
    return warnings


def _wait_replayed(cluster: Cluster, me: NodeState, timeout: float) -> None:
    """Refuse if the node has received WAL it has not replayed (after waiting ``timeout`` for it)."""
    if me.receive_lsn is None:
        return
    dsn = cluster.node(me.name).dsn
    target = me.receive_lsn
    deadline = time.monotonic() + timeout
    while True:
        replay, paused = sql.query_one(dsn, "SELECT pg_last_wal_replay_lsn()::text, pg_is_wal_replay_paused()")
        if replay is not None and sql.parse_lsn(replay) >= sql.parse_lsn(target):
            return
        if paused or time.monotonic() >= deadline:
            behind = sql.parse_lsn(target) - sql.parse_lsn(replay or "0/0")
            why = ("replay is paused: resume it with SELECT pg_wal_replay_resume()" if paused
                   else f"it is still replaying after {timeout:g} s; wait and try again")
            raise Refused(f"{me.name} received WAL up to {target} but replayed only up to {replay} "
                          f"({behind} bytes behind); promoting now would lose them: {why}")
        time.sleep(0.05)


def run_promote(cluster: Cluster, plan: PromotePlan, *, timeout: float = 60) -> PromoteResult:
    """Promote, verify, checkpoint."""
    dsn = cluster.node(plan.node).dsn
    before, after, seconds = fast_promote(dsn, timeout=timeout)
    sql.execute(dsn, "CHECKPOINT")
    return PromoteResult(plan.node, before, after, seconds, plan.warnings)


def fast_promote(dsn: str, *, timeout: float = 60, interval: float = 0.005,
                 on_sent: Callable[[], None] | None = None) -> tuple[int, int, float]:
    """``pg_promote(false)`` and poll every ``interval`` until out of recovery; (timeline before, after, seconds).

    ``pg_promote(true)`` checks only every 100 ms; polling on one open connection shortens the
    write pause of a switchover. ``on_sent`` is called just before ``pg_promote`` goes out: from
    then on, whatever happens, the server may be promoting.
    """
    with sql.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        if not cur.fetchone()[0]:
            raise OpsError("refusing to promote: the server is not in recovery (already a primary?)")
        before = sql.timeline(dsn)
        start = time.monotonic()
        if on_sent is not None:
            on_sent()
        cur.execute("SELECT pg_promote(false)")
        if not cur.fetchone()[0]:
            raise OpsError("pg_promote refused to signal the server; look at its log")
        while True:
            cur.execute("SELECT pg_is_in_recovery()")
            if not cur.fetchone()[0]:
                break
            if time.monotonic() - start > timeout:
                raise Timeout(f"the server did not leave recovery within {timeout:g} s of pg_promote; look at its log")
            time.sleep(interval)
        seconds = time.monotonic() - start
    after = sql.timeline(dsn)
    if after <= before:
        raise OpsError(f"promotion left the timeline at {after} (was {before}); look at the server log")
    logger.info("promoted: timeline %d -> %d in %.3f s", before, after, seconds)
    return before, after, seconds

"""The plan's "Master demotion procedure": make a former primary follow the new one.

Slot on the new primary, replication access checked in its ``pg_hba.conf``, ``pg_rewind`` when the
node wrote WAL the new primary never saw (prerequisites checked first), standby settings, start,
wait until it streams and has caught up.

Whether a rewind is needed is decided like Patroni: a cleanly shut down node whose last
checkpoint lies *before* the point where the new primary's timeline forked off can simply follow;
anything else (a crash, WAL past the fork) is rewound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import hba, replication, sql
from .cluster import Cluster
from .errors import OpsError, Refused
from .observe import observe_nodes, require_primary
from .procedure import FollowPlan
from .rewind import CLEAN, finish_crash_recovery
from .rewind import rewind as pg_rewind

logger = logging.getLogger(__name__)



@dataclass
class DemotePlan(FollowPlan):
    """What ``check_demote`` found and what ``run_demote`` will do."""

    already_following: bool = False
    stop_first: bool = False
    rewind: bool | None = None
    reason: str = ""
    hba: str = ""

    def steps(self) -> list[str]:
        if self.already_following:
            return [f"nothing: {self.node} already streams from {self.primary}"]
        steps = []
        if self.stop_first:
            steps.append(f"stop {self.node} (fast shutdown; it is running as a {self.node_role})")
        steps.append(f"replication slot {self.node!r} on {self.primary} (create if missing)")
        if self.rewind is None:
            steps.append(f"pg_rewind {self.node} from {self.primary} if it diverged (decided once it is stopped)")
        elif self.rewind:
            steps.append(f"pg_rewind {self.node} from {self.primary}: {self.reason}")
        else:
            steps.append(f"no pg_rewind needed: {self.reason}")
        steps += [
            f"standby settings on {self.node}: primary_conninfo -> {self.primary}, primary_slot_name, "
            "hot_standby = on, standby.signal",
            f"start {self.node}, wait until it streams from {self.primary} and has caught up",
        ]
        return steps

    def title(self) -> str:
        return f"make {self.node} follow {self.primary}"


@dataclass
class DemoteResult:
    node: str
    primary: str
    rewound: bool
    reason: str
    seconds: float
    nothing_to_do: bool = False

    def text(self) -> str:
        if self.nothing_to_do:
            return f"{self.node} already streams from {self.primary}: nothing to do"
        how = "rewound with pg_rewind" if self.rewound else "no pg_rewind needed"
        return (f"{self.node} streams from {self.primary} and has caught up ({how}: {self.reason}) "
                f"in {self.seconds:.1f} s")


def check_demote(cluster: Cluster, node: str, primary: str, *, force: bool = False) -> DemotePlan:
    """Refuse unless ``node`` can be made to follow ``primary``; returns the plan."""
    spec, pspec = cluster.node_and_upstream(node, primary, itself=f"{node} cannot follow itself; name the new "
                                                                  "primary with --primary")
    states = observe_nodes(cluster.inventory)
    p, n = states[primary], states[node]
    require_primary(p, f"promote it first: srht-readonly promote {primary}" if p.role == "standby"
                    else "start it first")
    plan = DemotePlan(node, primary, n.role)
    if n.role == "standby" and n.upstream == primary and n.receiver_status == "streaming":
        plan.already_following = True
        return plan
    if n.role == "primary":
        if not force:
            raise Refused(
                f"{node} is running as a primary: it may hold writes that {primary} does not have, and demoting "
                f"it discards them (pg_rewind). Stop it first (that is the confirmation), or pass --force"
            )
        plan.warnings.append(f"--force: writes {node} accepted after {primary} was promoted will be discarded")
    if n.role == "down" and cluster.server(node).is_running():
        # Unreachable is not stopped (max_connections, pg_hba, a firewall): it may be a primary
        # still taking writes, which a stop and a rewind would throw away.
        if not force:
            raise Refused(
                f"{node} does not answer over its dsn ({n.error}) but its postmaster runs: it may be a primary "
                f"taking writes. Find out why it does not answer (or stop it yourself), or pass --force"
            )
        plan.warnings.append(f"--force: {node} runs but does not answer; it is stopped and rewound whatever it holds")
    plan.stop_first = n.role != "down" or cluster.server(node).is_running()
    user = cluster.inventory.replication.user
    verdict = hba.replication_access(pspec.dsn, user, spec.address)
    if not verdict.allowed:
        method = "scram-sha-256" if cluster.inventory.replication.password_file else "trust"
        raise Refused(
            f"{primary}'s {verdict.file} does not let {user} stream from {spec.address} ({verdict.describe()}); "
            f"add this line before any other that matches, then SELECT pg_reload_conf():\n"
            f"  {hba.hba_line(user, spec.address, method)}"
        )
    plan.hba = verdict.describe()
    server = cluster.server(node)
    try:
        control = server.controldata()
    except OpsError as exc:
        raise Refused(f"cannot read {node}'s control file in {spec.data}: {exc}") from exc
    history = timeline_history(pspec.dsn, p.timeline or 1)
    if n.role == "down":
        plan.rewind, plan.reason = needs_rewind(control, history, p.timeline or 1)
    elif n.role == "primary":
        plan.rewind, plan.reason = True, f"{node} ran as a primary after {primary} was promoted"
    if plan.rewind is not False:
        _check_rewind_possible(cluster, node, primary, control, p.settings, sure=plan.rewind is True)
    return plan


def run_demote(cluster: Cluster, plan: DemotePlan, *, timeout: float = 120) -> DemoteResult:
    """Carry out the plan; each step is safe to repeat if a previous run stopped half-way."""
    start = time.monotonic()
    if plan.already_following:
        return DemoteResult(plan.node, plan.primary, False, "already following", 0.0, nothing_to_do=True)
    spec, pspec = cluster.node(plan.node), cluster.node(plan.primary)
    server = cluster.server(plan.node)
    server.wait_reaped()
    if server.is_running():
        server.stop("fast")
    replication.ensure_slot(pspec.dsn, plan.node, reserve=True)
    control = server.controldata()
    crashed = control.get("Database cluster state") not in CLEAN
    if crashed:
        finish_crash_recovery(server)
        control = server.controldata()
    primary_tli = sql.timeline(pspec.dsn)
    rewind, reason = needs_rewind(control, timeline_history(pspec.dsn, primary_tli), primary_tli)
    if crashed:
        reason = f"it had crashed (recovered in single-user mode first); {reason}"
    if rewind:
        _check_rewind_possible(cluster, plan.node, plan.primary, control,
                               dict(sql.query(pspec.dsn, "SELECT name, setting FROM pg_settings "
                                                         "WHERE name = 'full_page_writes'")), sure=True)
        source, env = cluster.rewind_source(plan.primary)
        pg_rewind(server, source, checkpoint_dsn=pspec.dsn, env=env)
    replication.configure_standby(server, cluster.replication_conninfo(plan.primary, plan.node), slot=plan.node)
    server.start(timeout=timeout)
    replication.wait_streaming(spec.dsn, timeout=timeout)
    replication.wait_caught_up(pspec.dsn, spec.dsn, timeout=timeout)
    # A slot named after the new primary, left from when it streamed from this node, would now
    # hold WAL back here for ever.
    replication.drop_slot(spec.dsn, plan.primary)
    took = time.monotonic() - start
    logger.info("%s follows %s (%s) after %.2f s", plan.node, plan.primary, reason, took)
    return DemoteResult(plan.node, plan.primary, rewind, reason, took)


def timeline_history(dsn: str, tli: int) -> dict[int, int]:
    """{timeline: LSN where it ended} from the server's ``%08X.history`` file (empty on timeline 1)."""
    if tli <= 1:
        return {}
    rows = sql.query(dsn, "SELECT pg_read_file('pg_wal/' || %s || '.history')", (f"{tli:08X}",))
    history = {}
    for line in (rows[0][0] if rows else "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            history[int(parts[0])] = sql.parse_lsn(parts[1])
    return history


def needs_rewind(control: dict[str, str], history: dict[int, int], primary_tli: int) -> tuple[bool, str]:
    """Does a node with this ``pg_controldata`` have to be rewound to follow a primary with this history?"""
    state = control.get("Database cluster state", "?")
    if state not in CLEAN:
        return True, f"it was not shut down cleanly (state: {state})"
    tli = int(control["Latest checkpoint's TimeLineID"])
    lsn = sql.parse_lsn(control["Latest checkpoint location"])
    min_recovery = control.get("Minimum recovery ending location", "0/0")
    lsn = max(lsn, sql.parse_lsn(min_recovery))
    if tli == primary_tli:
        return False, f"it is on the primary's timeline {tli}"
    if tli > primary_tli:
        return True, f"it is on timeline {tli}, ahead of the primary's {primary_tli}"
    if tli not in history:
        return True, f"its timeline {tli} is not in the primary's history"
    fork = history[tli]
    text = f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
    fork_text = f"{fork >> 32:X}/{fork & 0xFFFFFFFF:X}"
    if lsn < fork:
        return False, f"its last checkpoint {text} precedes the fork of timeline {tli + 1} at {fork_text}"
    return True, f"it wrote WAL up to {text} on timeline {tli}, past the fork at {fork_text}"


def _check_rewind_possible(cluster: Cluster, node: str, primary: str, control: dict[str, str],
                           primary_settings: dict[str, str], *, sure: bool) -> None:
    hints = control.get("wal_log_hints setting") == "on"
    checksums = control.get("Data page checksum version", "0") != "0"
    missing = []
    if not (hints or checksums):
        missing.append(f"{node} has neither wal_log_hints = on nor data checksums")
    if primary_settings.get("full_page_writes", "on") != "on":
        missing.append(f"{primary} runs with full_page_writes = off")
    if missing:
        maybe = "" if sure else "may need pg_rewind (decided once it is stopped), which cannot run here: "
        raise Refused(
            f"{node} {maybe or 'needs pg_rewind, which cannot run: '}{'; '.join(missing)}. Rebuild it from a "
            f"base backup instead: srht-readonly standby prepare {node} --from {primary} --force"
        )

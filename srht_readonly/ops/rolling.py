"""Rolling work on each node while it is the standby: the plan's minor upgrade and its host OS upgrade.

For each node in turn: if it is the primary, switch over to the standby first (no failed write:
``switchover``); then, while it is the standby, do the work:

* ``minor``: fast-stop, start on the new binaries (same major), wait until it streams and has
  replayed all the primary had written;
* ``host``: fast-stop PostgreSQL and every PgBouncer on the same host (same ssh destination),
  run the operator's command on the host (``--run``, which may reboot it: the host is waited
  for) or wait for the operator (``--wait``), then start what is not running again and wait
  until the node has caught up.

At the end the original primary is switched back, so roles are as they were. ``--all`` does every
node, the plan's "repeat the process again to upgrade the new standby": two switchovers for a pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import replication
from .cluster import Cluster
from .errors import OpsError, PartlyDone, Refused
from .fleet import Fleet
from .observe import observe_nodes, primary_and_standby
from .pgupgrade import major_of_bin, major_of_data
from .switchover import check_switchover, run_switchover

__all__ = ["RollingPlan", "RollingResult", "check_rolling", "run_rolling"]

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
#: How long a host may take to come back after the operator's command (a reboot).
HOST_TIMEOUT = 900.0


@dataclass
class RollingPlan:
    kind: str  # "minor" or "host"
    nodes: list[str]
    primary: str
    standby: str
    bin: str | None = None
    major: int | None = None
    command: str | None = None
    wait: bool = False
    bouncers_on_host: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def title(self) -> str:
        what = (f"restart {', '.join(self.nodes)} on {self.bin} (PostgreSQL {self.major})" if self.kind == "minor"
                else f"upgrade the host OS of {', '.join(self.nodes)}")
        return f"{what}, each while it is the standby"

    def steps(self) -> list[str]:
        steps, primary = [], self.primary
        for node in self.nodes:
            if node == primary:
                other = self.standby if node == self.primary else self.primary
                steps.append(f"switchover {node} -> {other} (no failed write)")
                primary = other
            if self.kind == "minor":
                steps.append(f"{node}: fast-stop, start on {self.bin}, wait until it has caught up")
            else:
                also = self.bouncers_on_host.get(node)
                steps.append(f"{node}: stop PostgreSQL" + (f" and PgBouncer {', '.join(also)}" if also else ""))
                steps.append(f"{node}'s host: run {self.command!r} (the host is waited for if it reboots)"
                             if self.command else f"{node}'s host: wait for the operator to press Enter")
                steps.append(f"{node}: start what is not running again, wait until it has caught up")
        if primary != self.primary:
            steps.append(f"switchover {primary} -> {self.primary} (roles as they were)")
        if self.kind == "minor" and self.bin:
            steps.append(f"afterwards: bin = {self.bin} for {', '.join(self.nodes)} in the inventory, if not already")
        return steps


@dataclass
class RollingResult:
    kind: str
    nodes: list[str]
    primary: str
    switchovers: list[dict[str, object]]
    per_node_seconds: dict[str, float]
    versions: dict[str, str]
    seconds: float

    def text(self) -> str:
        pauses = ", ".join(f"{s['from']}->{s['to']} {s['write_pause']:.3f} s" for s in self.switchovers)
        done = ", ".join(f"{n} ({self.versions.get(n, '?')}, {self.per_node_seconds[n]:.1f} s)" for n in self.nodes)
        return (f"{'restarted' if self.kind == 'minor' else 'host upgraded'}: {done}; {self.primary} is the primary "
                f"again; write pauses: {pauses or 'none (no switchover needed)'}; {self.seconds:.1f} s in all")


def check_rolling(cluster: Cluster, fleet: Fleet, node: str, *, kind: str, every: bool = False,
                  bin_dir: str | None = None, command: str | None = None, wait: bool = False) -> RollingPlan:
    """Refuse unless a primary has one streaming standby, every PgBouncer is reachable, and (minor) ``bin_dir``
    holds the node's major."""
    cluster.node(node)
    states = observe_nodes(cluster.inventory)
    primary, standby = primary_and_standby(states, what="this", why="each node must be the standby in turn")
    if node not in (primary, standby):
        raise Refused(f"{node} is neither the primary {primary} nor its streaming standby {standby}")
    nodes = [node] + ([n for n in (primary, standby) if n != node] if every else [])
    plan = RollingPlan(kind, nodes, primary, standby, command=command, wait=wait)
    if kind == "minor":
        server = cluster.server(node)
        plan.bin = str(bin_dir or server.bin)
        plan.major = major_of_bin(server, plan.bin)
        for name in nodes:
            have = major_of_data(cluster.server(name))
            if have != plan.major:
                raise Refused(f"{plan.bin} holds PostgreSQL {plan.major} and {name}'s data is {have}: that is a major "
                              f"upgrade (srht-readonly upgrade --major --to-bin {plan.bin})")
        if bin_dir is None:
            plan.warnings.append("no --bin: the nodes restart on the binaries they have (a rolling restart)")
    else:
        if not command and not wait:
            raise Refused("say what upgrades the host: --run COMMAND, or --wait to do it yourself")
        for name in nodes:
            ssh = cluster.node(name).ssh
            plan.bouncers_on_host[name] = [b for b, spec in cluster.inventory.pgbouncers.items()
                                           if ssh is not None and spec.ssh == ssh]
            if plan.bouncers_on_host[name]:
                plan.warnings.append(f"PgBouncer {', '.join(plan.bouncers_on_host[name])} runs on {name}'s host: its "
                                     f"clients fail while it is stopped")
    fleet.open()
    fleet.require_all()
    check_switchover(cluster, fleet, standby)  # the switchovers' own refusals, now rather than half-way
    return plan


def run_rolling(cluster: Cluster, fleet: Fleet, plan: RollingPlan, *, say: Say = logger.info,
                ask: Callable[[str], None] | None = None) -> RollingResult:
    """Carry out ``plan``; ``ask`` (``--wait``) blocks until the operator says the host is done."""
    started = time.monotonic()
    primary, switchovers, per_node = plan.primary, [], {}
    for node in plan.nodes:
        if node == primary:
            other = next(n for n in (plan.primary, plan.standby) if n != node)
            switchovers.append(_switch(cluster, fleet, node, other, say))
            primary = other
        t = time.monotonic()
        try:
            if plan.kind == "minor":
                _restart_on(cluster, node, plan.bin, say)
            else:
                _host(cluster, fleet, node, plan, say, ask)
            say(f"waiting until {node} has caught up with {primary}")
            replication.wait_streaming(cluster.node(node).dsn, timeout=120)
            replication.wait_caught_up(cluster.node(primary).dsn, cluster.node(node).dsn, timeout=300)
        except OpsError as exc:
            raise PartlyDone(f"{node} did not come back as a streaming standby: {exc}\n{primary} is the primary and "
                             f"every PgBouncer points at it; services are unaffected. Fix {node}, then run the same "
                             f"command again", {node: "standby, not streaming"}) from exc
        per_node[node] = round(time.monotonic() - t, 3)
    if primary != plan.primary:
        switchovers.append(_switch(cluster, fleet, primary, plan.primary, say))
    versions = {}
    for node in plan.nodes:
        versions[node] = str(replication.sql.query_one(cluster.node(node).dsn, "SHOW server_version")[0])
    return RollingResult(plan.kind, plan.nodes, plan.primary, switchovers, per_node, versions,
                         round(time.monotonic() - started, 3))


def _switch(cluster: Cluster, fleet: Fleet, old: str, new: str, say: Say) -> dict[str, object]:
    say(f"switchover {old} -> {new}")
    result = run_switchover(cluster, fleet, check_switchover(cluster, fleet, new), say=say)
    # The phases (seconds from the PAUSE) say where a long write pause went: PAUSE, stop, replay, promote.
    return {"from": old, "to": new, "write_pause": round(result.write_pause, 3),
            "phases": {k: round(v, 3) for k, v in result.phases.items()}}


def _restart_on(cluster: Cluster, node: str, bin_dir: str | None, say: Say) -> None:
    say(f"{node}: fast-stop, start on {bin_dir}")
    cluster.server(node).stop("fast")
    if bin_dir:
        cluster.use_bin(node, Path(bin_dir))
    cluster.server(node).start(timeout=300)


def _host(cluster: Cluster, fleet: Fleet, node: str, plan: RollingPlan, say: Say,
          ask: Callable[[str], None] | None) -> None:
    server = cluster.server(node)
    bouncers = plan.bouncers_on_host.get(node, [])
    say(f"{node}: stopping PostgreSQL" + (f" and PgBouncer {', '.join(bouncers)}" if bouncers else ""))
    server.stop("fast")
    for name in bouncers:
        fleet.shutdown(name)
    if plan.command:
        say(f"{node}'s host: running {plan.command!r}")
        host = cluster.node_host(node)
        proc = host.run(["sh", "-c", plan.command], check=False, timeout=HOST_TIMEOUT)
        if proc.returncode not in (0, 255):  # 255: ssh lost the host (a reboot)
            raise OpsError(f"{plan.command!r} exited {proc.returncode} on {host.name}: "
                           f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        _wait_host(cluster, node)
    elif ask is not None:
        ask(f"{node} and its host's PgBouncers are stopped: upgrade the host now, then press Enter")
    if not server.is_running():
        say(f"{node}: starting PostgreSQL")
        server.start(timeout=300)
    for name in bouncers:
        fleet.start(name)


def _wait_host(cluster: Cluster, node: str) -> None:
    """Until the node's host answers a command again (it may be rebooting)."""
    deadline = time.monotonic() + HOST_TIMEOUT
    host = cluster.node_host(node)
    while True:
        try:
            if host.run(["true"], check=False, timeout=30).returncode == 0:
                return
        except OpsError:
            pass
        if time.monotonic() > deadline:
            raise OpsError(f"{host.name} did not come back within {HOST_TIMEOUT:.0f} s")
        host.close()
        time.sleep(2)

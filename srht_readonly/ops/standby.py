"""The plan's "Preparing the hot standby", steps 1-8, as one command.

1. a LOGIN REPLICATION role on the primary, its password read from a file (never in argv or logs);
2. a ``pg_hba.conf`` line on the primary for the standby's address only (when none admits it);
3. a physical replication slot named after the standby;
4. a base backup (``pg_basebackup --checkpoint=fast -X stream``, progress reported) into the
   standby's data directory; an old directory is moved aside, never deleted, and the node's own
   config files (port, listen address...) are carried over from it;
5. standby settings: ``primary_conninfo``, ``primary_slot_name``, ``hot_standby``, ``standby.signal``;
6. start, wait until it streams and has replayed what the primary had written;
7. sanity check: same timeline, same databases.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import hba, replication, sql
from .cluster import Cluster
from .errors import Refused
from .observe import observe_node, require_primary
from .postgres import PostgresServer
from .procedure import FollowPlan
from .replication import Progress
from .rewind import LOCAL_FILES

logger = logging.getLogger(__name__)


@dataclass
class PreparePlan(FollowPlan):
    """What ``check_prepare`` found and what ``run_prepare`` will do."""

    nothing_to_do: bool = False
    data_in_use: bool = False
    hba_line: str | None = None

    def steps(self) -> list[str]:
        if self.nothing_to_do:
            return [f"nothing: {self.node} already streams from {self.primary} (--force rebuilds it)"]
        steps = [f"replication role on {self.primary} (LOGIN REPLICATION; password from the password file)"]
        steps.append(f"pg_hba.conf on {self.primary}: add '{self.hba_line}'" if self.hba_line
                     else f"pg_hba.conf on {self.primary} already admits {self.node}: unchanged")
        steps.append(f"replication slot {self.node!r} on {self.primary}")
        if self.node_role != "down":
            steps.append(f"stop {self.node} (it runs as a {self.node_role})")
        if self.data_in_use:
            steps.append(f"move {self.node}'s data directory aside (kept, not deleted)")
        steps += [
            f"base backup of {self.primary} into {self.node}'s data directory (fast checkpoint, WAL streamed)",
            f"standby settings on {self.node}: primary_conninfo, primary_slot_name, hot_standby = on, standby.signal",
            f"start {self.node}; wait until it streams and has caught up; compare timeline and databases",
        ]
        return steps

    def title(self) -> str:
        return f"make {self.node} a hot standby of {self.primary}"


@dataclass
class PrepareResult:
    node: str
    primary: str
    seconds: float
    moved_aside: str | None = None
    hba_line: str | None = None
    sanity: dict[str, object] = field(default_factory=dict)
    nothing_to_do: bool = False

    def text(self) -> str:
        if self.nothing_to_do:
            return f"{self.node} already streams from {self.primary}: nothing to do"
        moved = f"; old data directory kept at {self.moved_aside}" if self.moved_aside else ""
        hba = f"; pg_hba.conf: added '{self.hba_line}'" if self.hba_line else ""
        return (f"{self.node} is a streaming hot standby of {self.primary} (timeline {self.sanity.get('timeline')}, "
                f"same databases) after {self.seconds:.1f} s{moved}{hba}")


def check_prepare(cluster: Cluster, node: str, primary: str, *, force: bool = False) -> PreparePlan:
    """Refuse unless ``node`` can be (re)built from ``primary``; a running primary is never touched."""
    spec, pspec = cluster.node_and_upstream(node, primary, itself=f"{node} cannot be a standby of itself; name "
                                                                  "the primary with --from")
    p, n = observe_node(pspec), observe_node(spec)
    require_primary(p, "a base backup must come from the primary")
    if n.role == "primary":
        raise Refused(f"{node} is running as a primary; refusing to overwrite it. If it is a former primary, make it "
                      f"follow with: srht-readonly demote {node} --primary {primary}")
    plan = PreparePlan(node, primary, n.role)
    following = n.role == "standby" and n.upstream in (f"{pspec.address}:{pspec.port}", primary)
    if following and n.receiver_status == "streaming" and not force:
        plan.nothing_to_do = True
        return plan
    server = cluster.server(node)
    plan.data_in_use = server.host.exists(server.data) and bool(server.host.listdir(server.data))
    if (plan.data_in_use or n.role != "down") and not force:
        raise Refused(f"{node}'s data directory {spec.data} is not empty; pass --force to stop {node} and move it "
                      f"aside (it is kept, not deleted) before the base backup")
    cluster.inventory.replication.password()  # unreadable password file: refuse now, not half-way
    user = cluster.inventory.replication.user
    verdict = hba.replication_access(pspec.dsn, user, spec.address)
    if not verdict.allowed:
        plan.hba_line = hba.hba_line(user, spec.address, _method(cluster))
    if p.settings.get("full_page_writes") == "off":
        plan.warnings.append(f"{primary} runs with full_page_writes = off: the base backup may slow it down, and "
                             f"pg_rewind will not work")
    if cluster.inventory.replication.password_file is None:
        plan.warnings.append("no password-file in [replication]: the pg_hba.conf line added (if any) uses trust")
    return plan


def run_prepare(cluster: Cluster, plan: PreparePlan, *, progress: Progress | None = None,
                timeout: float = 3600) -> PrepareResult:
    """Carry out ``plan``; safe to run again after a failure (with --force once the data directory has files)."""
    start = time.monotonic()
    if plan.nothing_to_do:
        return PrepareResult(plan.node, plan.primary, 0.0, nothing_to_do=True)
    spec, pspec = cluster.node(plan.node), cluster.node(plan.primary)
    repl = cluster.inventory.replication
    replication.ensure_replication_role(pspec.dsn, repl.user, repl.password())
    result = PrepareResult(plan.node, plan.primary, 0.0)
    if plan.hba_line:
        primary_server = cluster.server(plan.primary)
        result.hba_line = hba.allow_replication(
            primary_server.host, pspec.dsn, repl.user, spec.address, method=_method(cluster),
            comment=f"srht-readonly standby prepare {plan.node}: replication from {plan.node} only",
        )
    replication.ensure_slot(pspec.dsn, plan.node, reserve=True)
    server = cluster.server(plan.node)
    if server.is_running():
        server.stop("fast")
    kept: dict[str, str] = {}
    if server.host.exists(server.data) and server.host.listdir(server.data):
        for name in LOCAL_FILES:
            if server.host.exists(server.data / name):
                kept[name] = server.host.read_text(server.data / name)
        aside = f"{server.data}.before-prepare-{time.strftime('%Y%m%d-%H%M%S')}"
        server.host.rename(server.data, aside)
        result.moved_aside = aside
        logger.info("moved %s aside to %s", server.data, aside)
    passfile = _write_passfile(cluster, server, plan.primary)
    try:
        conninfo = cluster.replication_conninfo(plan.primary, plan.node, password=False)
        replication.base_backup(server, conninfo, slot=plan.node, progress=progress, timeout=timeout,
                                env={"PGPASSFILE": str(passfile)} if passfile else None)
    finally:
        if passfile:
            server.host.remove(passfile)
    for name, text in kept.items():
        server.write_file(name, text)
    replication.configure_standby(server, cluster.replication_conninfo(plan.primary, plan.node), slot=plan.node,
                                  extra=None if kept else {"port": int(spec.port)})
    server.start()
    replication.wait_streaming(spec.dsn, timeout=60)
    replication.wait_caught_up(pspec.dsn, spec.dsn, timeout=120)
    result.sanity = sanity_check(pspec.dsn, spec.dsn)
    result.seconds = time.monotonic() - start
    return result


def sanity_check(primary_dsn: str, standby_dsn: str) -> dict[str, object]:
    """Plan step 8: the standby is in recovery, on the primary's timeline, with the same databases."""
    role = sql.role(standby_dsn)
    tli_p, tli_s = sql.timeline(primary_dsn), sql.timeline(standby_dsn)
    dbs = "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1"
    same_dbs = sql.query(primary_dsn, dbs) == sql.query(standby_dsn, dbs)
    if role != "standby" or tli_p != tli_s or not same_dbs:
        raise Refused(f"sanity check failed: role {role}, timelines {tli_p}/{tli_s}, same databases: {same_dbs}")
    return {"role": role, "timeline": tli_s, "same_databases": same_dbs}


def _method(cluster: Cluster) -> str:
    return "scram-sha-256" if cluster.inventory.replication.password_file else "trust"


def _write_passfile(cluster: Cluster, server: PostgresServer, primary: str) -> Path | None:
    """A temporary ``.pgpass`` on the standby's host, so pg_basebackup's password is not in its argv."""
    password = cluster.inventory.replication.password()
    if password is None:
        return None
    target = cluster.node(primary).target
    escaped = password.replace("\\", "\\\\").replace(":", "\\:")
    line = f"{target['host']}:{target['port']}:*:{cluster.inventory.replication.user}:{escaped}\n"
    path = server.data.parent / f".srht-readonly-pgpass-{os.getpid()}"
    server.host.write_text_atomic(path, line, owner=server.os_user, mode=0o600)
    return path

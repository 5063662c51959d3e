"""``status``: every node and PgBouncer as observed now, and what needs attention.

Nothing here changes anything or raises for an unreachable host: what cannot be reached is
reported (and is itself a problem). ``problems()`` flags what would hurt a failover: a standby
that does not stream or lags, an inactive slot holding WAL, PgBouncers split between nodes or
paused, ``server_login_retry`` above a few seconds, ``auth_type = trust``, and nodes that
``pg_rewind`` could not bring back. ``collect`` also times a tiny commit on the primary
(``sql.commit_seconds``, as the exporter does) and warns of a **slow primary** above
``[status] slow-commit`` (0.1 s by default): a soft outage, the database online but awful.

Severities: ``critical``, ``warning`` and ``info``. Expected states are ``info`` (shown, never
paging anyone): PgBouncers pointing at the standby while an announced maintenance window is in
effect on the service hosts (``[service NAME]``), and ``auth_type = trust`` on a PgBouncer that
listens only on loopback or its Unix socket (the plan's own layout). ``check_exit`` turns them
into ``status --check``'s Nagios-style exit status.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from . import announce, desired, etcd
from .backup import Barman
from .cluster import Cluster
from .errors import OpsError
from .fleet import BouncerState, Fleet, seconds_setting
from .inventory import EtcdSpec
from .observe import NodeState, observe_nodes, primaries
from .sql import COMMIT_TRIES, time_commit

logger = logging.getLogger(__name__)

LAG_WARN_BYTES = 16 * 1024 * 1024
LOGIN_RETRY_WARN = 3.0
#: The ``tcp_user_timeout`` (ms) recommended for every PgBouncer: a server that has not acknowledged what was
#: sent to it for that long is gone, and the client waiting on it gets an error instead of a 15 min hang.
TCP_USER_TIMEOUT_MS = 2000
LOOPBACK = {"127.0.0.1", "::1", "localhost"}

#: ``status --check`` exit statuses (Nagios plugin convention).
CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3


@dataclass
class Problem:
    """Something to know; ``severity`` is ``critical``, ``warning`` or ``info`` (expected: pages nobody)."""

    severity: str
    subject: str
    message: str


@dataclass
class Status:
    """The fleet as observed, with its problems."""

    inventory: str
    nodes: list[NodeState]
    pgbouncers: list[BouncerState]
    problems: list[Problem] = field(default_factory=list)
    #: The maintenance announcement of the service hosts (``[service NAME]``): ``message``, ``starts``,
    #: ``ends`` (ISO 8601 or None), ``in_effect``; None when none is published (or no service host listed).
    announcement: dict[str, Any] | None = None
    #: Service hosts whose announcement file could not be read: {service: error}.
    announcement_errors: dict[str, str] = field(default_factory=dict)
    #: Whether the service hosts' announcement files differ (a partly done ``announce``).
    announcements_differ: bool = False
    #: How far into the past the database can be opened (``past_window``).
    past: dict[str, Any] = field(default_factory=dict)
    #: A tiny commit on the primary, in seconds (median of ``sql.COMMIT_TRIES``); None when not timed.
    commit_seconds: float | None = None
    #: With ``[etcd]``: each endpoint's health (``etcd.health``) and every agent's last heartbeat, by
    #: PgBouncer (``etcd.agents``: ``state``, ``points_at``, ``sees``, ``age``...); None without ``[etcd]``.
    etcd: list[dict[str, Any]] | None = None
    agents: dict[str, dict[str, Any]] | None = None
    #: With ``[etcd]``: the fleet's desired state (``ops.desired``: ``generation``, ``primary``, ``timeline``,
    #: ``pgbouncers``, ``by``, ``time``); None without ``[etcd]`` or before any procedure wrote one.
    fleet_state: dict[str, Any] | None = None
    #: With ``[etcd]``: the pause flag of a switchover under way (``by``, ``since``, ``limit``), or None.
    pause: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``status --json`` document (``nodes[].role``, ``pgbouncers[].target``... see docs/cli.md)."""
        data = dataclasses.asdict(self)
        for node, raw in zip(data["nodes"], self.nodes, strict=True):
            node["position"] = raw.position
            node.pop("replicas", None)
        return data


def collect(cluster: Cluster) -> Status:
    """Observe every node and PgBouncer of the inventory."""
    nodes = observe_nodes(cluster.inventory)
    with Fleet(cluster) as fleet:
        fleet.open()
        bouncers = fleet.observe()
        for name, record in fleet.timer_records().items():
            bouncers[name].resumed_by_timer = record
    status = Status(cluster.inventory.path, list(nodes.values()), list(bouncers.values()))
    seen = announce.read_all(cluster)
    status.announcement = _announcement(seen, time.time())
    status.announcement_errors = {h.service: h.error for h in seen if h.error}
    status.announcements_differ = len({h.announcement for h in seen if not h.error}) > 1
    status.problems = problems(status)
    status.past, found = past_window(cluster, status.nodes)
    status.problems += found
    status.commit_seconds, found = primary_commit(cluster, status.nodes)
    status.problems += found
    if cluster.inventory.etcd is not None:
        status.etcd, status.agents, found = fleet_in_etcd(cluster.inventory.etcd, list(bouncers))
        status.problems += found
        if status.agents is not None:  # etcd answers
            status.fleet_state, found = desired_state(cluster.inventory.etcd, status.pgbouncers, status.agents)
            status.problems += found
            status.pause, found = pause_flag(cluster.inventory.etcd, time.time())
            status.problems += found
    status.problems.sort(key=lambda p: ("critical", "warning", "info").index(p.severity))
    return status


def primary_commit(cluster: Cluster, nodes: list[NodeState]) -> tuple[float | None, list[Problem]]:
    """The primary's commit latency (``sql.time_commit``) and, if it is slow, the problem; nothing without
    a single primary (that is a problem of its own)."""
    live = [n for n in nodes if n.role == "primary"]
    if len(live) != 1:
        return None, []
    node = live[0]
    try:
        seconds = time_commit(cluster.node(node.name).dsn)
    except OpsError as exc:
        return None, [Problem("warning", f"node {node.name}", f"a tiny commit could not be timed: {exc}")]
    return seconds, commit_problems(node.name, seconds, cluster.inventory.status.slow_commit)


Beats = dict[str, dict[str, Any]]


def fleet_in_etcd(spec: EtcdSpec, pgbouncers: list[str]) -> tuple[list[dict[str, Any]], Beats | None, list[Problem]]:
    """etcd's health and the agents' heartbeats (``ops.etcd``), and what needs an operator in them."""
    found: list[Problem] = []
    try:
        endpoints = etcd.health(spec)
    except ImportError as exc:
        return [], None, [Problem("warning", "etcd", f"[etcd] is set but its client is not installed "
                                                     f"(pip install 'srht-readonly[etcd]'): {exc}")]
    if not any(e["healthy"] for e in endpoints):
        found.append(Problem("critical", "etcd", "no endpoint has a healthy cluster behind it (down, or its quorum "
                                                 "lost): every changing command is refused (the fleet lock), and "
                                                 "every agent is frozen: none moves its PgBouncer, whatever "
                                                 "happens to the primary, until etcd is back"))
    for e in endpoints:
        if not e["healthy"] and any(x["healthy"] for x in endpoints):
            found.append(Problem("warning", "etcd", f"{e['endpoint']} is not healthy: {e['error']}"))
    healthy = tuple(e["endpoint"] for e in endpoints if e["healthy"])
    if not healthy:
        return endpoints, None, found
    try:
        beats = etcd.agents(spec, endpoints=healthy)
    except (OpsError, ImportError) as exc:
        return endpoints, None, [*found, Problem("warning", "etcd", str(exc))]
    for name, beat in sorted(beats.items()):
        if beat.get("state") == "away":
            found.append(Problem("warning", f"agent {name}", f"moved its PgBouncer to {beat.get('points_at')} "
                                                             f"(read-only): {beat.get('why')}; promote it "
                                                             f"(srht-readonly promote) or wait for the primary"))
        elif beat.get("state") in ("waiting", "hands-off"):
            found.append(Problem("info", f"agent {name}", f"{beat['state']}: {beat.get('why')}"))
    if not beats:
        found.append(Problem("info", "agents", "no agent heartbeat in etcd: no agent runs (or none reaches etcd); "
                                               "PgBouncers fail over only by hand"))
    else:  # agents run here: a PgBouncer without one is not watched
        for name in pgbouncers:
            if name not in beats:
                found.append(Problem("warning", f"agent {name}", "no heartbeat: its agent is not running, or cannot "
                                                                 "reach etcd; that PgBouncer fails over only by hand"))
    return endpoints, beats, found


def desired_state(spec: EtcdSpec, bouncers: list[BouncerState], beats: Beats) -> tuple[dict[str, Any] | None,
                                                                                      list[Problem]]:
    """The fleet's desired state in etcd, and a warning for each PgBouncer that points elsewhere than it
    says (except one its agent moved to the standby: that is the agent's own failover, reported above)."""
    try:
        state, _ = desired.read(spec)
    except OpsError as exc:
        return None, [Problem("warning", "etcd", str(exc))]
    if state is None:
        return None, []
    found = []
    for b in bouncers:
        want = state.pgbouncers.get(b.name)
        if want and b.target and b.target != want and beats.get(b.name, {}).get("state") != "away":
            found.append(Problem("warning", f"pgbouncer {b.name}", f"points at {b.target}, but the fleet's state in "
                                                                   f"etcd (generation {state.generation}, by "
                                                                   f"{state.by}) says {want}: run `srht-readonly "
                                                                   f"failover --to NODE` to set where it must point"))
    return dataclasses.asdict(state), found


def pause_flag(spec: EtcdSpec, now: float) -> tuple[dict[str, Any] | None, list[Problem]]:
    """The pause flag in etcd (``desired.PauseFlag``), and a warning while it is up."""
    try:
        flag = desired.paused(spec)
    except OpsError as exc:
        return None, [Problem("warning", "etcd", str(exc))]
    if flag is None:
        return None, []
    since = float(flag.get("since", now))
    return flag, [Problem("warning", "fleet", f"every PgBouncer paused by {flag.get('by')} for {now - since:.0f} s "
                                               f"(dead-man limit {flag.get('limit')} s): a switchover under way, or "
                                               f"one that died, whose timers RESUME the PgBouncers within the "
                                               f"limit; the flag goes with the pause")]


def commit_problems(node: str, seconds: float, threshold: float) -> list[Problem]:
    """A warning when ``seconds`` (a tiny commit on the primary ``node``) is above ``threshold``."""
    if seconds <= threshold:
        return []
    return [Problem("warning", f"node {node}", f"is slow: a tiny commit takes {seconds * 1000:.0f} ms (median of "
                                               f"{COMMIT_TRIES}; [status] slow-commit = {threshold:g} s): a soft "
                                               f"outage? Look at its disk (a resilver, a saturated device), its "
                                               f"CPU, locks and synchronous standbys")]


def past_window(cluster: Cluster, nodes: list[NodeState]) -> tuple[dict[str, Any], list[Problem]]:
    """The plan's "how far into the past can we peek?": Barman's recoverable window when ``[backup]`` names
    one; otherwise what the primary keeps, said plainly: WAL for its standbys, no base backup."""
    spec = cluster.inventory.backup
    if spec is not None:
        try:
            window = Barman(spec, cluster.host(spec.ssh)).window()
        except OpsError as exc:
            return {"engine": "barman", "error": str(exc)}, [Problem("warning", "backup", f"cannot read the "
                                                                     f"recoverable window: {exc}")]
        found = [Problem("warning", "backup", p) for p in window.problems]
        if window.earliest is None:
            found.append(Problem("warning", "backup", "no base backup: nothing in the past can be opened"))
        elif not window.streaming:
            found.append(Problem("warning", "backup", f"WAL does not stream to Barman: the past ends at "
                                                      f"{window.latest}"))
        return {**dataclasses.asdict(window), "text": window.text()}, found
    primary = next((n for n in nodes if n.role == "primary"), None)
    if primary is None:
        return {"engine": None, "text": "no backup engine, and no primary to ask what WAL it keeps"}, []
    keep = primary.settings.get("wal_keep_size")
    keep_text = f"wal_keep_size = {keep} MB" if keep is not None else \
        f"wal_keep_segments = {primary.settings.get('wal_keep_segments', '?')}"
    held = max((s.retained_bytes or 0 for s in primary.slots), default=0)
    text = (f"no backup engine ([backup]): nothing in the past can be opened. {primary.name} keeps WAL only for "
            f"its standbys: {keep_text}, and its slots hold {held // 2**20} MB; WAL without a base backup "
            f"cannot be replayed onto anything (docs/past.md)")
    return {"engine": None, "wal_keep": keep_text, "slots_hold_bytes": held, "text": text}, []


def check_exit(status: Status) -> int:
    """``status --check``: 2 if any problem is critical, 1 if any is a warning, else 0 (``info`` pages nobody)."""
    severities = {p.severity for p in status.problems}
    if "critical" in severities:
        return CHECK_CRITICAL
    return CHECK_WARNING if "warning" in severities else CHECK_OK


def _announcement(seen: list[announce.HostAnnouncement], now: float) -> dict[str, Any] | None:
    # What the services see is their hosts' files: etcd's copy (listed as "etcd") never makes one in effect.
    hosts = [h for h in seen if h.service != "etcd"]
    current = announce.in_effect(hosts, now) or next((h.announcement for h in hosts if h.announcement), None)
    if current is None:
        return None
    return {"message": current.message, "starts": current.starts.isoformat() if current.starts else None,
            "ends": current.ends.isoformat() if current.ends else None, "in_effect": current.in_effect(now),
            "hosts": sorted(h.service for h in seen if h.announcement == current)}


def problems(status: Status) -> list[Problem]:
    """What in ``status`` needs an operator, worst first (then ``info``: expected, shown only)."""
    found: list[Problem] = []
    nodes = {n.name: n for n in status.nodes}
    live = primaries(nodes)
    if not live:
        found.append(Problem("critical", "cluster", "no node is a primary: writes fail everywhere. Promote a standby "
                                                    "(srht-readonly promote NODE) once the old primary is gone"))
    elif len(live) > 1:
        found.append(Problem("critical", "cluster", f"{' and '.join(live)} are all primaries (split brain); stop "
                                                    "all but one and demote them"))
    for node in status.nodes:
        found += _node_problems(node, live[0] if len(live) == 1 else None)
    announced = bool(status.announcement and status.announcement["in_effect"])
    for service, error in status.announcement_errors.items():
        found.append(Problem("warning", "etcd", f"its copy of the announcement cannot be read: {error}")
                     if service == "etcd" else  # announce.read_all lists etcd's copy as one more host
                     Problem("warning", f"service {service}", f"its announcement file cannot be read: {error}"))
    if status.announcements_differ:
        found.append(Problem("warning", "announcement", "the service hosts' announcement files (and etcd's copy, "
                                                        "with [etcd]) differ (a partly done announce?); "
                                                        "srht-readonly announce --list shows each, announce again "
                                                        "or --clear"))
    for bouncer in status.pgbouncers:
        found += _bouncer_problems(bouncer, nodes, live, announced)
    found.sort(key=lambda p: ("critical", "warning", "info").index(p.severity))
    return found


def _node_problems(node: NodeState, primary: str | None) -> list[Problem]:
    subject = f"node {node.name}"
    if node.role == "down":
        return [Problem("critical", subject, f"does not answer: {node.error}")]
    found = []
    if node.role == "standby":
        if node.receiver_status != "streaming":
            receiver = node.receiver_status or "not running"
            found.append(Problem("critical", subject, f"is not streaming (WAL receiver: {receiver}); check its log "
                                                      f"and primary_conninfo"))
        elif primary is not None and node.upstream != primary:
            found.append(Problem("warning", subject, f"streams from {node.upstream}, not from the primary {primary}"))
        if node.replay_paused:
            found.append(Problem("warning", subject, "replay is paused; SELECT pg_wal_replay_resume() to continue"))
        if node.lag_bytes is not None and node.lag_bytes > LAG_WARN_BYTES:
            found.append(Problem("warning", subject, f"is {node.lag_bytes / 2**20:.1f} MB behind the primary"))
    for slot in node.slots:
        if not slot.active and slot.restart_lsn is not None:
            held = f"{(slot.retained_bytes or 0) / 2**20:.1f} MB"
            found.append(Problem("warning", subject, f"slot {slot.name!r} has no consumer and retains {held} of WAL "
                                                     f"(it grows until the disk is full); if {slot.name} is gone for "
                                                     f"good: SELECT pg_drop_replication_slot('{slot.name}')"))
    settings = node.settings
    if settings.get("wal_log_hints") == "off" and settings.get("data_checksums") == "off":
        found.append(Problem("warning", subject, "wal_log_hints is off and there are no data checksums: after an "
                                                 "unplanned failover it cannot be rewound, only rebuilt; set "
                                                 "wal_log_hints = on (restart needed)"))
    if settings.get("full_page_writes") == "off":
        found.append(Problem("warning", subject, "full_page_writes is off: pg_rewind refuses to run from it"))
    return found


def _bouncer_problems(b: BouncerState, nodes: dict[str, NodeState], live: list[str],
                      announced: bool = False) -> list[Problem]:
    subject = f"pgbouncer {b.name}"
    if not b.reachable:
        return [Problem("critical", subject, f"cannot be reached: {b.error}")]
    found = []
    if b.paused:
        found.append(Problem("critical", subject, "is PAUSED: its clients are waiting; RESUME it on its console"))
    if b.resumed_by_timer:
        found.append(Problem("warning", subject, f"was resumed by its dead-man timer ({b.resumed_by_timer}); the "
                                                 "procedure that paused it stopped half-way: check the nodes' roles "
                                                 "above and where this PgBouncer points (the next procedure that "
                                                 "finishes clears this)"))
    target = nodes.get(b.target or "")
    if target is None:
        found.append(Problem("critical", subject, f"points at {b.target}, which is not one node of the inventory; "
                                                  f"srht-readonly failover --to NODE repoints it"))
    elif target.role == "down":
        found.append(Problem("critical", subject, f"points at {b.target}, which is down; "
                                                  f"srht-readonly failover --to {live[0] if live else 'STANDBY'}"))
    elif target.role == "standby" and announced:
        found.append(Problem("info", subject, f"points at the standby {b.target}: its services are read-only, as "
                                              f"the maintenance announcement in effect says"))
    elif target.role == "standby":
        found.append(Problem("warning", subject, f"points at the standby {b.target}: its services are read-only"
                                                 + (f"; srht-readonly promote {b.target}, or failover --to {live[0]}"
                                                    if live else f"; srht-readonly promote {b.target}")))
    if b.file_target != b.target:
        found.append(Problem("warning", subject, f"its config file points at {b.file_target} but it runs with "
                                                 f"{b.target}: not reloaded (an interrupted failover?); run "
                                                 f"srht-readonly failover --to NODE again"))
    retry = seconds_setting(b.settings.get("server_login_retry"))
    if retry > LOGIN_RETRY_WARN:
        found.append(Problem("warning", subject, f"server_login_retry = {b.settings.get('server_login_retry')}: after "
                                                 f"a crash its pool stays blocked that long; set it to 1 in its "
                                                 f"config (failover also lowers it at once)"))
    user_timeout = (b.settings.get("tcp_user_timeout") or "").strip()
    if user_timeout in ("", "0"):
        found.append(Problem("warning", subject, f"tcp_user_timeout = {user_timeout or '0 (unset)'}: "
                                                 f"a node behind a black hole (a cut link, a firewall dropping its "
                                                 f"packets) holds every query sent to it for ~15 min of TCP "
                                                 f"retransmissions, even after a failover; set tcp_user_timeout = "
                                                 f"{TCP_USER_TIMEOUT_MS} (ms) in its config"))
    if b.settings.get("auth_type") == "trust":
        if _loopback_only(b.settings.get("listen_addr", "")):
            found.append(Problem("info", subject, "auth_type = trust, listening on loopback only "
                                                  f"(listen_addr = {b.settings.get('listen_addr') or 'unset'}): "
                                                  "only local users reach it, as the plan lays it out"))
        else:
            found.append(Problem("warning", subject, f"auth_type = trust on listen_addr = "
                                                     f"{b.settings.get('listen_addr')}: anyone who reaches its port "
                                                     "is any user; use scram-sha-256 or md5 with an auth_file, or "
                                                     "listen on 127.0.0.1 only"))
    return found


def _loopback_only(listen_addr: str) -> bool:
    """Whether PgBouncer's ``listen_addr`` reaches only this machine (unset: the Unix socket only)."""
    addresses = {a.strip() for a in listen_addr.split(",") if a.strip()}
    return addresses <= LOOPBACK

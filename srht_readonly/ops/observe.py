"""What each PostgreSQL node is doing right now: role, timeline, WAL positions, lag, slots, settings.

Roles are observed (``pg_is_in_recovery()``), never remembered. A node that does not answer is
``down``, with the reason kept; nothing here raises for an unreachable node.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from . import sql
from .errors import OpsError, Refused
from .inventory import Inventory, NodeSpec
from .versions import Pg

logger = logging.getLogger(__name__)

SETTINGS = ("server_version", "server_version_num", "wal_log_hints", "data_checksums", "full_page_writes",
            "hot_standby", "wal_level", "max_wal_senders", "primary_slot_name", "wal_keep_size", "wal_keep_segments",
            "max_slot_wal_keep_size", "archive_mode")


@dataclass
class Slot:
    """A replication slot and the WAL it holds back on its node."""

    name: str
    active: bool
    restart_lsn: str | None
    retained_bytes: int | None
    wal_status: str | None


@dataclass
class NodeState:
    """One node as observed; ``role`` is ``primary``, ``standby`` or ``down`` (then ``error`` says why)."""

    name: str
    role: str
    error: str | None = None
    timeline: int | None = None
    current_lsn: str | None = None
    receive_lsn: str | None = None
    replay_lsn: str | None = None
    replay_paused: bool = False
    upstream: str | None = None
    receiver_status: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replay_age_seconds: float | None = None
    slots: list[Slot] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    replicas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def position(self) -> str | None:
        """Where the node is: its insert position (primary) or what it replayed (standby)."""
        return self.current_lsn if self.role == "primary" else self.replay_lsn


def observe_node(spec: NodeSpec) -> NodeState:
    """Connect to ``spec.dsn`` once and read everything ``status`` shows about the node."""
    try:
        with sql.connect(spec.dsn) as conn, conn.cursor() as cur:
            return _read(spec, cur)
    except (OpsError, psycopg2.Error) as exc:
        return NodeState(spec.name, "down", error=str(exc).strip())


def observe_nodes(inventory: Inventory) -> dict[str, NodeState]:
    """Every node of the inventory, in parallel, then lag computed against the primary."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(inventory.nodes))) as pool:
        states = dict(zip(inventory.nodes, pool.map(observe_node, inventory.nodes.values()), strict=True))
    _fill_lag(inventory, states)
    return states


def require_primary(state: NodeState, why: str) -> None:
    """``Refused`` unless ``state`` is a primary; ``why`` says what needs one, or what to do."""
    if state.role != "primary":
        raise Refused(f"{state.name} is not a primary ({state.role}{': ' + state.error if state.error else ''}); "
                      f"{why}")


def primaries(states: dict[str, NodeState]) -> list[str]:
    """Names of the nodes out of recovery now (more than one is a split brain)."""
    return [name for name, s in states.items() if s.role == "primary"]


def primary_and_standby(states: dict[str, NodeState], *, what: str, why: str) -> tuple[str, str]:
    """The one primary and a standby streaming from it, or ``Refused`` saying ``what`` needs them and ``why``."""
    live = primaries(states)
    if len(live) != 1:
        raise Refused(f"{what} needs exactly one primary; found {', '.join(live) or 'none'}")
    standbys = [n for n, s in states.items() if s.role == "standby" and s.receiver_status == "streaming"]
    if not standbys:
        raise Refused(f"no standby streams from {live[0]}: {why} (srht-readonly standby prepare NODE --from {live[0]})")
    return live[0], standbys[0]


def _read(spec: NodeSpec, cur: Any) -> NodeState:
    cur.execute("SELECT pg_is_in_recovery()")
    in_recovery = cur.fetchone()[0]
    state = NodeState(spec.name, "standby" if in_recovery else "primary")
    cur.execute("SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(SETTINGS),))
    state.settings = dict(cur.fetchall())
    if in_recovery:
        cur.execute(
            "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, pg_is_wal_replay_paused(),"
            " extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
        )
        state.receive_lsn, state.replay_lsn, state.replay_paused, state.replay_age_seconds = cur.fetchone()
        cur.execute("SELECT status, sender_host, sender_port, received_tli FROM pg_stat_wal_receiver")
        row = cur.fetchone()
        if row:
            state.receiver_status = row[0]
            state.upstream = f"{row[1]}:{row[2]}" if row[1] else None
        cur.execute("SELECT timeline_id FROM pg_control_checkpoint()")
        checkpoint_tli = cur.fetchone()[0]
        state.timeline = max(checkpoint_tli, row[3] or 0) if row else checkpoint_tli
        here = "pg_last_wal_replay_lsn()"
    else:
        cur.execute("SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_insert_lsn())")
        state.current_lsn, walfile = cur.fetchone()
        state.timeline = int(walfile[:8], 16)
        cur.execute(
            "SELECT application_name, client_addr::text, state, sent_lsn::text, replay_lsn::text,"
            " extract(epoch FROM replay_lag)::float8, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint"
            " FROM pg_stat_replication"
        )
        cols = ("application_name", "client_addr", "state", "sent_lsn", "replay_lsn", "replay_lag", "lag_bytes")
        state.replicas = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
        here = "pg_current_wal_lsn()"
    cur.execute(slots_query(here, int(state.settings.get("server_version_num") or 0)))
    state.slots = [Slot(*row) for row in cur.fetchall()]
    return state


def slots_query(here: str, version_num: int) -> str:
    """The physical slots with the WAL each retains up to ``here``; ``wal_status`` exists from PostgreSQL 13
    (``server_version_num`` 130000), NULL before."""
    wal_status = Pg.of(version_num).slot_wal_status
    return ("SELECT slot_name, active, restart_lsn::text, "
            f"CASE WHEN restart_lsn IS NULL OR {here} IS NULL THEN NULL"
            f" ELSE pg_wal_lsn_diff({here}, restart_lsn)::bigint END, {wal_status}"
            " FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY slot_name")


def _fill_lag(inventory: Inventory, states: dict[str, NodeState]) -> None:
    """Lag of each standby behind the primary: bytes not yet replayed, and seconds."""
    names = primaries(states)
    primary = states[names[0]] if len(names) == 1 else None
    for name, state in states.items():
        if state.role != "standby":
            continue
        if state.upstream and (upstream := _node_at(inventory, state.upstream)):
            state.upstream = upstream
        if primary is None or primary.current_lsn is None or state.replay_lsn is None:
            continue
        state.lag_bytes = max(0, sql.parse_lsn(primary.current_lsn) - sql.parse_lsn(state.replay_lsn))
        replica = next((r for r in primary.replicas if r["application_name"] == name), None)
        if state.lag_bytes == 0:
            state.lag_seconds = 0.0
        elif replica is not None and replica["replay_lag"] is not None:
            state.lag_seconds = float(replica["replay_lag"])
        else:
            state.lag_seconds = state.replay_age_seconds


def _node_at(inventory: Inventory, host_port: str) -> str | None:
    host, _, port = host_port.rpartition(":")
    node = inventory.node_at(host, port)
    return node.name if node else None

"""``announce``: write, list and clear the maintenance announcement on every service host.

Each ``[service NAME]`` of the inventory names a host (``ssh``, absent: this machine) and the
announcement file its processes read (``$SRHT_READONLY_ANNOUNCE_FILE`` there, docs/monitor.md).
The file format is the services' own (``srht_readonly._announcement``, stdlib only: the one
definition of the format both sides share). Files are replaced atomically on each host (mode
0644, ``Host.write_text_atomic``), every host in parallel; a host that cannot be written is
named, the others keep what they got (exit 3, and running the same command again is safe).

With an inventory ``[etcd]`` section the announcement is also kept in etcd, under
``PREFIX/announcement`` (removed by ``clear``), as part of the fleet's state: ``read_all`` lists it
beside the hosts (as ``etcd``), so ``announce --list`` shows it and ``status`` warns when a host's
file differs from it. The services themselves read only their host's file: etcd is never on
their path.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from .._announcement import Announcement
from .cluster import Cluster
from .errors import OpsError, PartlyDone, Refused
from .inventory import EtcdSpec, ServiceSpec

logger = logging.getLogger(__name__)


@dataclass
class HostAnnouncement:
    """What one service host's announcement file says (``error`` when it could not be read)."""

    service: str
    path: str
    announcement: Announcement | None = None
    error: str | None = None


@dataclass
class AnnounceResult:
    """What ``publish``/``clear`` did on each host (``ok`` or the error)."""

    action: str
    hosts: dict[str, str] = field(default_factory=dict)
    announcement: Announcement | None = None

    def text(self) -> str:
        lines = [f"{self.action}: {self.announcement.message!r}" if self.announcement else self.action]
        lines += [f"  {name}: {outcome}" for name, outcome in self.hosts.items()]
        return "\n".join(lines)


def _services(cluster: Cluster) -> list[ServiceSpec]:
    services = list(cluster.inventory.services.values())
    if not services:
        raise Refused(f"{cluster.inventory.path} has no [service NAME] section: nowhere to announce; add one per "
                      f"service host with announcement = /path/its/processes/read")
    return services


def _each(cluster: Cluster, fn: object) -> dict[str, str]:
    services = _services(cluster)

    def one(spec: ServiceSpec) -> str:
        try:
            fn(cluster.host(spec.ssh), spec)  # type: ignore[operator]
            return "ok"
        except (OSError, OpsError) as exc:
            logger.warning("service host %s: %s", spec.name, exc)
            return f"failed: {str(exc).strip()}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(services)) as pool:
        outcomes = dict(zip((s.name for s in services), pool.map(one, services), strict=True))
    failed = {name: o for name, o in outcomes.items() if o != "ok"}
    if failed:
        done = [name for name, o in outcomes.items() if o == "ok"]
        raise PartlyDone(f"{len(failed)} of {len(outcomes)} service host(s) not updated: "
                         + "; ".join(f"{n}: {o}" for n, o in failed.items())
                         + (f" (done: {', '.join(done)})" if done else " (none was changed)"), outcomes)
    return outcomes


def publish(cluster: Cluster, announcement: Announcement) -> AnnounceResult:
    """Write ``announcement`` to every service host's announcement file."""
    if announcement.starts and announcement.ends and announcement.ends <= announcement.starts:
        raise Refused("--until must be after --from")
    if announcement.ends and announcement.ends.timestamp() <= time.time():
        raise Refused(f"--until {announcement.ends.isoformat()} is already past: the announcement would be over "
                      f"before any service saw it")
    text = announcement.to_json() + "\n"
    hosts = _each(cluster, lambda host, spec: host.write_text_atomic(spec.announcement, text, mode=0o644))
    return AnnounceResult("announced", _in_etcd(cluster.inventory.etcd, hosts, text), announcement)


def clear(cluster: Cluster) -> AnnounceResult:
    """Remove the announcement file on every service host (services turn writable within ``recheck``)."""
    hosts = _each(cluster, lambda host, spec: host.remove(spec.announcement))
    return AnnounceResult("cleared", _in_etcd(cluster.inventory.etcd, hosts, None))


def _in_etcd(spec: EtcdSpec | None, hosts: dict[str, str], text: str | None) -> dict[str, str]:
    """With ``[etcd]``: ``text`` as ``PREFIX/announcement`` (None: removed); ``hosts`` with ``etcd``'s outcome.
    The hosts are done by then: a failure here is ``PartlyDone`` (running the command again is safe)."""
    if spec is None:
        return hosts
    from .etcd import client, why

    try:
        etcd = client(spec)
        if text is None:
            etcd.delete(f"{spec.prefix}/announcement")
        else:
            etcd.put(f"{spec.prefix}/announcement", text)
    except Exception as exc:  # noqa: BLE001 - Refused, or etcd3gw's own errors
        raise PartlyDone(f"every service host is done, but etcd's copy of the announcement is not: {why(exc)}",
                         {**hosts, "etcd": f"failed: {why(exc)}"}) from exc
    return {**hosts, "etcd": "ok"}


def read_all(cluster: Cluster) -> list[HostAnnouncement]:
    """Each service host's current announcement (None: no file), never raising for a host."""
    services = list(cluster.inventory.services.values())

    def one(spec: ServiceSpec) -> HostAnnouncement:
        seen = HostAnnouncement(spec.name, spec.announcement)
        try:
            host = cluster.host(spec.ssh)
            text = host.read_text(spec.announcement)
            seen.announcement = Announcement.parse(text) if text.strip() else None
        except FileNotFoundError:
            pass
        except (OSError, OpsError, ValueError) as exc:
            seen.error = str(exc).strip()
        return seen

    if not services:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(services)) as pool:
        seen = list(pool.map(one, services))
    return seen if cluster.inventory.etcd is None else [*seen, _from_etcd(cluster.inventory.etcd)]


def _from_etcd(spec: EtcdSpec) -> HostAnnouncement:
    """etcd's copy (``PREFIX/announcement``), as one more host."""
    from .etcd import client, why

    seen = HostAnnouncement("etcd", f"{spec.prefix}/announcement")
    try:
        values = client(spec).get(seen.path)
        if values:
            raw = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
            seen.announcement = Announcement.parse(raw)
    except Exception as exc:  # noqa: BLE001 - status and --list show it, never fail on it
        seen.error = why(exc)
    return seen


def in_effect(seen: list[HostAnnouncement], now: float) -> Announcement | None:
    """The announcement in effect at ``now`` on any service host, if one is."""
    for host in seen:
        if host.announcement is not None and host.announcement.in_effect(now):
            return host.announcement
    return None


def describe(announcement: Announcement | None, now: float) -> str:
    """One line: the message and its window, and whether it is in effect at ``now``."""
    if announcement is None:
        return "none"
    window = []
    if announcement.starts:
        window.append(f"from {_iso(announcement.starts)}")
    if announcement.ends:
        window.append(f"until {_iso(announcement.ends)}")
    if announcement.in_effect(now):
        state = "IN EFFECT (read-only)"
    elif announcement.starts and now < announcement.starts.timestamp():
        state = "announced, not yet in effect"
    else:
        state = "over"
    return f"{announcement.message!r} {' '.join(window)} [{state}]".replace("  ", " ")


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds")

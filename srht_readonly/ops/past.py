"""The database as it was at a given time: a throwaway, read-only PostgreSQL instance of its own.

``open_past(cluster, at=T)`` restores the newest base backup that ended before T with Barman
(``backup.Barman.recover``) into ``PAST_DIR/ID/data`` on the Barman host, replays WAL to T and
pauses there: ``hot_standby = on``, a port of its own, a socket directory of its own, listening on
localhost only, no ``primary_conninfo``, no slot, no archiving, and never in the PgBouncer fleet.
``open_past(cluster, snapshot=DIR)`` starts the same kind of instance from a crash-consistent copy
of a data directory (a mounted ZFS snapshot ``.zfs/snapshot/NAME``): copied first (``cp -a
--reflink=auto``), never started in place; with ``at`` it then replays Barman's WAL to T.

Each instance is described by ``PAST_DIR/ID/instance.json``; ``list_past`` reads them and
``stop_past`` stops and removes them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg2.extensions

from . import sql
from .backup import BackupWindow, Barman
from .cluster import Cluster
from .errors import OpsError, Refused
from .inventory import BackupSpec, InventoryError
from .postgres import PostgresServer, find_bin_dir
from .remote import Host, LocalHost

__all__ = ["PastInstance", "list_past", "open_past", "stop_past"]

logger = logging.getLogger(__name__)

Say = Callable[[str], None]
#: Free space kept beyond the estimate of a restore (WAL replayed, logs).
DISK_MARGIN = 64 * 2**20
#: Seconds a target may lie ahead of this machine's clock (clock skew between hosts).
FUTURE_SLACK = 1.0


@dataclass
class PastInstance:
    id: str
    url: str
    dsn: str
    directory: str
    port: int
    host: str
    source: str
    at: str | None
    recovered_to: str | None
    seconds: float
    created: str
    running: bool = True

    def text(self) -> str:
        to = f"recovered to {self.recovered_to}" if self.recovered_to else "recovered (no transaction replayed)"
        state = "" if self.running else " [not running]"
        return (f"{self.id}{state}: {self.url}  {to} (asked {self.at or 'as the snapshot was'}) from {self.source}, "
                f"in {self.seconds:.1f} s; {self.directory}")


def _spec(cluster: Cluster) -> BackupSpec:
    spec = cluster.inventory.backup
    if spec is None:
        raise InventoryError(cluster.inventory.path, None, "no [backup] section: past data needs a backup engine "
                                                           "(docs/past.md: config =, server = of your Barman)")
    return spec


def _where(cluster: Cluster) -> tuple[Host, Path, str | None]:
    """The host the instances run on (Barman's), their directory, and the [backup] ssh destination."""
    spec = cluster.inventory.backup
    if spec is None:
        return cluster.host(None), Path(BackupSpec.past_dir), None
    return cluster.host(spec.ssh), Path(spec.past_dir), spec.ssh


def _bin(cluster: Cluster, host: Host) -> Path:
    spec = cluster.inventory.backup
    if spec is not None and spec.bin:
        return Path(spec.bin)
    for node in cluster.inventory.nodes.values():
        if node.bin:
            return Path(node.bin)
    return find_bin_dir(None) if isinstance(host, LocalHost) else Path("/usr/lib/postgresql/15/bin")


def open_past(cluster: Cluster, *, at: dt.datetime | None = None, snapshot: str | None = None, force: bool = False,
              say: Say = logger.info) -> PastInstance:
    """Start an instance of the past (see the module docstring); ``Refused`` (nothing made) when it cannot be."""
    if at is None and snapshot is None:
        raise ValueError("give at= or snapshot=")
    host, past_dir, _ = _where(cluster)
    barman = Barman(_spec(cluster), host) if (snapshot is None or at is not None) else None
    window: BackupWindow | None = None
    if at is not None:
        if at.timestamp() > time.time() + FUTURE_SLACK:
            raise Refused(f"{at.isoformat()} is in the future")
        assert barman is not None
        barman.cron()  # streaming (re)started now rather than at the next minute's cron
        _nudge(cluster, at, say, barman)
        window = barman.window()
        if window.earliest is None:
            raise Refused(f"nothing can be recovered yet: {window.text()}")
        if at < dt.datetime.fromisoformat(window.earliest):
            raise Refused(f"{at.isoformat()} is before the earliest recoverable point:\n{window.text()}")
        if window.latest is not None and at > dt.datetime.fromisoformat(window.latest):
            raise Refused(f"{at.isoformat()} is after the latest recoverable point (WAL does not stream to "
                          f"Barman):\n{window.text()}")
    if not host.exists(past_dir):
        raise Refused(f"{past_dir} does not exist on {host.name}: create it, owned by the user Barman runs as "
                      f"([backup] past-dir)")
    on_data = _shares_a_data_volume(cluster, host, past_dir)
    if on_data and not force:
        raise Refused(f"{past_dir} is on the same file system as {on_data}'s data directory: a restore there could "
                      f"fill the production node's volume. Set [backup] past-dir elsewhere, or pass --force")
    base = barman.base_for(at) if (barman is not None and at is not None and snapshot is None) else None
    needed = (base.size_bytes or 0) + DISK_MARGIN if base else _size(host, Path(snapshot or "/")) + DISK_MARGIN
    free = _free(host, past_dir)
    if free < needed:
        raise Refused(f"not enough free disk in {past_dir}: about {needed // 2**20} MB needed, {free // 2**20} MB "
                      f"free" + (f"\n{window.text()}" if window else ""))
    ident = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    home = past_dir / ident
    owner = host.owner(past_dir)  # type: ignore[attr-defined]
    host.make_dir(home, owner=owner, mode=0o755)  # type: ignore[attr-defined]
    host.make_dir(home / "sockets", owner=owner, mode=0o700)  # type: ignore[attr-defined]
    data = home / "data"
    started = time.monotonic()
    try:
        if snapshot is None:
            assert barman is not None and base is not None and at is not None
            say(f"restoring base backup {base.id} into {data}, to replay up to {at.isoformat()}")
            barman.recover(base, str(data), at)
            source = f"base backup {base.id}"
        else:
            say(f"copying {snapshot} to {data} (the snapshot itself is never started)")
            _copy_snapshot(host, Path(snapshot), data, owner, barman, at)
            source = f"snapshot {snapshot}"
        server = PostgresServer(data, bin=_bin(cluster, host), host=host, os_user=host.owner(data),  # type: ignore
                                log=home / "postgres.log")
        port = _free_port(host)
        server.set_settings({
            "port": port, "listen_addresses": "localhost", "unix_socket_directories": str(home / "sockets"),
            "hot_standby": True, "archive_mode": False, "primary_conninfo": "", "primary_slot_name": "",
            "logging_collector": False,
        })
        say("starting it: replay, then pause at the target")
        server.start(timeout=600)
        dsn = _dsn(cluster, host, home / "sockets", port)
        recovered_to = _wait_recovered(dsn, paused=at is not None, log=lambda: _tail(host, home / "postgres.log"))
    except BaseException:
        _remove(host, home, owner)
        raise
    seconds = time.monotonic() - started
    user = dict(psycopg2.extensions.parse_dsn(_first_dsn(cluster))).get("user", "postgres")
    where = "127.0.0.1" if isinstance(host, LocalHost) else host.name
    instance = PastInstance(ident, f"postgresql://{user}@{where}:{port}/postgres", dsn, str(home), port, host.name,
                            source, at.isoformat() if at else None, recovered_to, round(seconds, 2),
                            dt.datetime.now(dt.UTC).isoformat())
    host.write_text_atomic(home / "instance.json", json.dumps(asdict(instance), indent=2), owner=owner, mode=0o644)
    return instance


def list_past(cluster: Cluster) -> list[PastInstance]:
    host, past_dir, _ = _where(cluster)
    if not host.exists(past_dir):
        return []
    out = []
    for name in sorted(host.listdir(past_dir)):  # type: ignore[attr-defined]
        path = past_dir / name / "instance.json"
        if not host.exists(path):
            continue
        instance = PastInstance(**json.loads(host.read_text(path)))
        instance.running = host.exists(past_dir / name / "data" / "postmaster.pid")
        out.append(instance)
    return out


def stop_past(cluster: Cluster, ids: list[str] | None = None) -> list[str]:
    """Stop and remove the instances ``ids`` (None: all of them); the ids removed."""
    host, past_dir, _ = _where(cluster)
    known = {i.id: i for i in list_past(cluster)}
    wanted = ids or list(known)
    unknown = [i for i in wanted if i not in known]
    if unknown:
        raise Refused(f"no instance {', '.join(unknown)} in {past_dir} (srht-readonly past --list)")
    for ident in wanted:
        _remove(host, past_dir / ident, host.owner(past_dir))  # type: ignore[attr-defined]
    return wanted


# --- helpers -------------------------------------------------------------------------------------


def _first_dsn(cluster: Cluster) -> str:
    return next(iter(cluster.inventory.nodes.values())).dsn


def _dsn(cluster: Cluster, host: Host, sockets: Path, port: int) -> str:
    """How this machine reaches the instance: its socket, through the host's tunnel when remote."""
    params = dict(psycopg2.extensions.parse_dsn(_first_dsn(cluster)))
    where, tport = host.tunnel(str(sockets), port)
    return psycopg2.extensions.make_dsn(host=where, port=str(tport), user=params.get("user", "postgres"),
                                        dbname="postgres", **({"password": params["password"]}
                                                              if "password" in params else {}))


def _wait_recovered(dsn: str, *, paused: bool, log: Callable[[], str], timeout: float = 600) -> str | None:
    """Until replay paused at the target (``paused``), or the instance answers (a snapshot); the last commit
    replayed, ISO 8601."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with sql.connect(dsn, timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT current_setting('server_version_num')::int")
                version = cur.fetchone()[0]
                if paused:
                    cur.execute("SELECT pg_get_wal_replay_pause_state() = 'paused'" if version >= 140000
                                else "SELECT pg_is_wal_replay_paused()")
                    if not cur.fetchone()[0]:
                        time.sleep(0.05)
                        continue
                cur.execute("SELECT pg_last_xact_replay_timestamp()")
                ts = cur.fetchone()[0]
                return ts.astimezone(dt.UTC).isoformat() if ts else None
        except OpsError as exc:
            last_error = str(exc)
            if "recovery ended before configured recovery target was reached" in log():
                raise OpsError("the archive ends before the time asked for: no transaction committed after it has "
                               "reached Barman yet; try a slightly earlier time") from exc
            time.sleep(0.2)
    raise OpsError(f"the instance did not reach its target within {timeout:.0f} s ({last_error}); {log()}")


def _nudge(cluster: Cluster, at: dt.datetime, say: Say, barman: Barman | None = None) -> None:
    """Make sure a commit after ``at`` exists and is in Barman's archive, so replay can stop at ``at`` (only
    commit records carry times): a transaction that writes nothing but its own id on the primary, then the
    segment holding it closed and archived."""
    for node in cluster.inventory.nodes.values():
        try:
            if sql.role(node.dsn) != "primary":
                continue
            sql.execute(node.dsn, "SELECT txid_current()")  # its own transaction: a commit record
            sql.wait_until(lambda n=node: sql.query(
                n.dsn, "SELECT 1 FROM pg_stat_replication WHERE application_name = 'barman_receive_wal'"),
                timeout=15, what="Barman's WAL streaming (barman receive-wal) to connect")
            if barman is not None:
                seconds = barman.switch_wal(node.dsn)
                say(f"the WAL past {at.isoformat()} is archived (switch-wal, {seconds:.1f} s)")
            return
        except OpsError as exc:
            say(f"could not make sure the archive reaches past {at.isoformat()}: {exc}")
            return


def _copy_snapshot(host: Host, snapshot: Path, data: Path, owner: str, barman: Barman | None,
                   at: dt.datetime | None) -> None:
    if not host.exists(snapshot / "PG_VERSION"):
        raise Refused(f"{snapshot} is not a PostgreSQL data directory (no PG_VERSION)")
    host.run(["cp", "-a", "--reflink=auto", f"{snapshot}/.", str(data)], timeout=6 * 3600)
    host.run(["chown", "-R", owner, str(data)], timeout=3600)
    host.run(["chmod", "700", str(data)])
    host.run(["rm", "-f", *(str(data / n) for n in ("postmaster.pid", "standby.signal", "recovery.signal"))])
    server = PostgresServer(data, host=host, os_user=owner, bin=Path("/"))  # type: ignore[arg-type]
    if at is None:  # read-only, as far as the copy goes: a standby with nothing to stream from
        server.write_file("standby.signal", "")
        server.set_settings({"restore_command": None, "recovery_target_time": None, "recovery_target_action": None})
        return
    assert barman is not None
    # -P: also the segment being streamed (its .partial), where the newest commits are
    restore = f"{barman.spec.barman} -c {barman.spec.config} get-wal -P {barman.spec.server} %f > %p"
    server.set_settings({"restore_command": restore, "recovery_target_time": at.isoformat(),
                         "recovery_target_action": "pause", "recovery_target_timeline": "latest"})
    server.write_file("recovery.signal", "")


def _shares_a_data_volume(cluster: Cluster, host: Host, path: Path) -> str | None:
    """The node whose data directory is on the same file system as ``path`` on ``host``, if any."""
    mine = _filesystem(host, path)
    spec = cluster.inventory.backup
    for node in cluster.inventory.nodes.values():
        if node.ssh != (spec.ssh if spec else None):
            continue  # another machine
        if _filesystem(host, Path(node.data).parent) == mine:
            return node.name
    return None


def _filesystem(host: Host, path: Path) -> str:
    return host.run(["df", "-P", str(path)], check=False, timeout=30).stdout.strip().splitlines()[-1].split()[0]


def _free(host: Host, path: Path) -> int:
    return int(host.run(["df", "-Pk", str(path)], timeout=30).stdout.splitlines()[-1].split()[3]) * 1024


def _size(host: Host, path: Path) -> int:
    proc = host.run(["du", "-sk", str(path)], check=False, timeout=3600)
    return int(proc.stdout.split()[0]) * 1024 if proc.returncode == 0 and proc.stdout.strip() else 0


def _free_port(host: Host) -> int:
    if isinstance(host, LocalHost):
        from .ports import free_port

        return free_port()
    out = host.run(["python3", "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                                     "print(s.getsockname()[1])"], timeout=30).stdout
    return int(out.strip())


def _tail(host: Host, log: Path, lines: int = 15) -> str:
    text = host.read_text(log) if host.exists(log) else ""
    return "server log says:\n" + "\n".join(text.strip().splitlines()[-lines:])


def _remove(host: Host, home: Path, owner: str) -> None:
    data = home / "data"
    if host.exists(data / "postmaster.pid"):
        pid = host.read_text(data / "postmaster.pid").split("\n", 1)[0].strip()
        if pid.isdigit():
            host.run(["kill", "-INT", pid], check=False)  # fast shutdown
            deadline = time.monotonic() + 30
            while host.exists(data / "postmaster.pid") and time.monotonic() < deadline:
                time.sleep(0.1)
            if host.exists(data / "postmaster.pid"):
                host.run(["kill", "-9", pid], check=False)
    host.run(["rm", "-rf", str(home)], check=False, timeout=3600)


"""The lab: a primary, a streaming hot standby and a PgBouncer on free loopback ports.

Everything lives in one directory (``Lab(directory)``, a temporary one by default) that the
lab's OS user can read, and is described by ``lab.json`` in it, so ``Lab.attach(directory)``
finds a lab that another process started (``srht-readonly lab up``/``down``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..ops import replication, sql
from ..ops.console import Admin
from ..ops.errors import OpsError
from ..ops.pgbouncer import PgBouncerProcess, render_config, repoint
from ..ops.ports import free_port
from ..ops.postgres import PostgresServer, find_bin_dir
from ..ops.remote import LocalHost

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
APP_USER = "srht"
APP_DB = "srht"
REPLICATION_USER = "replicator"
NODE_NAMES = ("remilia", "konpaku")
STATE_FILE = "lab.json"

# Settings that make a failover drill behave like production, minus durability across an OS
# crash (nothing here survives a reboot anyway).
NODE_SETTINGS: dict[str, object] = {
    "listen_addresses": HOST,
    "wal_level": "replica",
    "wal_log_hints": True,
    "hot_standby": True,
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_keep_size": "64MB",
    "max_connections": 200,
    "shared_buffers": "32MB",
    "fsync": False,
    "full_page_writes": True,
    "logging_collector": False,
    "log_line_prefix": "%m [%p] ",
    "wal_receiver_status_interval": "1s",
    "hot_standby_feedback": True,
}


class LabNode:
    """One PostgreSQL server of the lab, reachable on ``127.0.0.1:port``."""

    def __init__(self, lab: Lab, name: str, port: int) -> None:
        self.lab = lab
        self.name = name
        self.host = HOST
        self.port = port
        self.server = PostgresServer(
            lab.directory / name / "data", bin=lab.bin, host=lab.hostos, os_user=lab.os_user,
            log=lab.directory / name / "postgres.log",
        )

    def __repr__(self) -> str:
        return f"<LabNode {self.name} {self.host}:{self.port}>"

    def dsn_for(self, *, user: str = APP_USER, dbname: str = APP_DB) -> str:
        return f"host={self.host} port={self.port} user={user} dbname={dbname}"

    @property
    def dsn(self) -> str:
        """libpq keyword DSN of the application database, as the application role."""
        return self.dsn_for()

    @property
    def url(self) -> str:
        """The same as a ``postgresql://`` URL."""
        return f"postgresql://{APP_USER}@{self.host}:{self.port}/{APP_DB}"

    @property
    def admin_dsn(self) -> str:
        """Superuser DSN (``postgres``/``postgres``), for what the application may not do."""
        return self.dsn_for(user="postgres", dbname="postgres")

    @property
    def target(self) -> dict[str, str]:
        """How PgBouncer reaches this node."""
        return {"host": self.host, "port": str(self.port)}

    def role(self) -> str:
        """``primary``, ``standby`` or ``down`` (observed)."""
        try:
            return sql.role(self.admin_dsn)
        except OpsError:
            return "down"

    def is_running(self) -> bool:
        return self.server.is_running()

    def start(self, *, timeout: float = 60) -> None:
        self.server.start(timeout=timeout)

    def stop(self, mode: str = "fast") -> None:
        self.server.stop(mode)

    def kill(self) -> None:
        """``kill -9`` the postmaster."""
        self.server.kill()


class LabBouncer:
    """The lab's PgBouncer (transaction pooling), in front of whichever node it points at."""

    def __init__(self, lab: Lab, port: int, target: str, *, name: str = "pgbouncer",
                 settings: dict[str, object] | None = None) -> None:
        self.lab = lab
        self.name = name
        self.host = HOST
        self.port = port
        self.target = target
        # Overrides of the [pgbouncer] settings below; None removes one (PgBouncer's default).
        self.settings = dict(settings or {})
        base = lab.directory / name
        self.config_path = base / "pgbouncer.ini"
        self.process = PgBouncerProcess(base / "pgbouncer.ini", base / "pgbouncer.pid",
                                        os_user=lab.os_user, host=lab.hostos)
        self.admin = Admin(self.admin_dsn)

    def __repr__(self) -> str:
        return f"<LabBouncer {self.host}:{self.port} -> {self.target}>"

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={APP_USER} dbname={APP_DB}"

    @property
    def url(self) -> str:
        return f"postgresql://{APP_USER}@{self.host}:{self.port}/{APP_DB}"

    @property
    def admin_dsn(self) -> str:
        return f"host={self.host} port={self.port} user=postgres dbname=pgbouncer"

    def write_config(self) -> None:
        base = self.config_path.parent
        self.lab.hostos.make_dir(base, owner=self.lab.os_user, mode=0o755)
        node = self.lab.nodes[self.target]
        conninfo = f"host={node.host} port={node.port}"
        defaults: dict[str, object] = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": base / "userlist.txt",
            "admin_users": "postgres",
            "pool_mode": "transaction",
            "max_client_conn": 500,
            "default_pool_size": 20,
            # docs/facts.md: the default 15 s turns a crash into a 15 s outage.
            "server_login_retry": 1,
            "query_wait_timeout": 30,
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": base / "pgbouncer.log",
            "pidfile": base / "pgbouncer.pid",
        }
        settings = {k: v for k, v in {**defaults, **self.settings}.items() if v is not None}
        # "*": any other database name (tests' own databases) goes to the same node.
        text = render_config(settings, {APP_DB: f"{conninfo} dbname={APP_DB}", "*": conninfo})
        self.lab.hostos.write_text_atomic(self.config_path, text, owner=self.lab.os_user, mode=0o640)
        users = f'"{APP_USER}" ""\n"postgres" ""\n'
        self.lab.hostos.write_text_atomic(base / "userlist.txt", users, owner=self.lab.os_user, mode=0o640)

    def start(self) -> None:
        self.process.start()
        sql.wait_until(lambda: self.admin.databases(), timeout=10, what="pgbouncer's console")

    def stop(self) -> None:
        self.process.stop()

    def point_at(self, node: LabNode | str) -> None:
        """Repoint every database at ``node``, RELOAD, and wait until SHOW DATABASES agrees."""
        node = self.lab.node(node)
        text = self.lab.hostos.read_text(self.config_path)
        self.lab.hostos.write_text_atomic(self.config_path, repoint(text, node.target))
        self.admin.reload()
        self.target = node.name
        self.lab.save()

        def switched() -> bool:
            return all(int(r["port"]) == node.port for r in self.admin.show("DATABASES")
                       if r["name"] in (APP_DB,))

        sql.wait_until(switched, timeout=5, what=f"pgbouncer to point at {node.name}")


class Lab:
    """A primary, a hot standby and a PgBouncer in ``directory`` (a new temporary one if None).

    ``with Lab() as lab:`` starts everything and tears it all down on exit, even after an error.
    ``os_user`` runs the servers (``postgres`` when we are root, else ourselves).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        os_user: str | None = None,
        pg_bin: str | os.PathLike[str] | None = None,
        standby: bool = True,
        pgbouncer: bool = True,
    ) -> None:
        self.owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="srht-lab-")).resolve()
        self.os_user = os_user or ("postgres" if os.geteuid() == 0 else _me())
        self.bin = find_bin_dir(pg_bin)
        self.hostos = LocalHost()
        self.with_standby = standby
        self.with_pgbouncer = pgbouncer
        self.nodes: dict[str, LabNode] = {}
        self.pgbouncer: LabBouncer | None = None
        self.extra_bouncers: dict[str, LabBouncer] = {}
        self.timings: dict[str, float] = {}
        self._closers: list[tuple[str, Callable[[], object]]] = []

    # --- lookup ------------------------------------------------------------------------------

    def node(self, node: LabNode | str) -> LabNode:
        return node if isinstance(node, LabNode) else self.nodes[node]

    def _by_role(self, wanted: str) -> LabNode:
        for node in self.nodes.values():
            if node.role() == wanted:
                return node
        raise OpsError(f"no node of the lab is a {wanted} right now")

    @property
    def primary(self) -> LabNode:
        """The node that is out of recovery now (observed, not remembered)."""
        return self._by_role("primary")

    @property
    def standby(self) -> LabNode:
        """A node in recovery now."""
        return self._by_role("standby")

    def wait_caught_up(self, *, timeout: float = 30) -> str:
        """Wait until the standby has replayed all the primary had written when called; that WAL position.

        Replication is asynchronous: a table created just before a read-only failover may not
        be on the standby yet. Call this before pointing PgBouncer at the standby.
        """
        return replication.wait_caught_up(self.primary.admin_dsn, self.standby.admin_dsn, timeout=timeout)

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Bring up the primary, then the standby from a base backup, then PgBouncer."""
        say = progress or (lambda _msg: None)
        t0 = time.monotonic()
        self.hostos.make_dir(self.directory, owner=self.os_user, mode=0o755)
        self._check_reachable()
        first, second = NODE_NAMES
        primary = self._add_node(first)
        say(f"initdb {first}")
        primary.server.initdb()
        primary.server.set_settings({**NODE_SETTINGS, "port": primary.port,
                                     "unix_socket_directories": str(self.directory / first)})
        primary.server.write_file("pg_hba.conf", _hba(), mode=0o600)
        say(f"start {first}")
        primary.start()
        self._bootstrap_roles(primary)
        self.timings["primary"] = time.monotonic() - t0
        self.save()
        if self.with_standby:
            say(f"base backup {first} -> {second}")
            self.add_standby(second, primary)
            self.timings["standby"] = time.monotonic() - t0
        if self.with_pgbouncer:
            say("start pgbouncer")
            self.pgbouncer = LabBouncer(self, free_port(), primary.name)
            self.pgbouncer.write_config()
            self.pgbouncer.start()
        self.timings["total"] = time.monotonic() - t0
        self.save()
        logger.info("lab up in %.2f s: %s", self.timings["total"], self.describe())

    def _check_reachable(self) -> None:
        """The servers run as ``os_user``: every directory above ours must let it through."""
        if self.hostos.run(["test", "-w", str(self.directory)], user=self.os_user, check=False).returncode:
            raise OpsError(
                f"the lab's OS user {self.os_user} cannot write {self.directory} (a parent directory is "
                f"not searchable by it); choose a directory it can reach, e.g. under /tmp"
            )

    def _add_node(self, name: str) -> LabNode:
        node = LabNode(self, name, free_port())
        self.nodes[name] = node
        self.hostos.make_dir(self.directory / name, owner=self.os_user, mode=0o755)
        return node

    def _bootstrap_roles(self, primary: LabNode) -> None:
        replication.ensure_replication_role(primary.admin_dsn, REPLICATION_USER)
        sql.execute(primary.admin_dsn, f"CREATE ROLE {APP_USER} LOGIN CREATEDB")
        sql.execute(primary.admin_dsn, f"CREATE DATABASE {APP_DB} OWNER {APP_USER}")

    def replication_conninfo(self, node: LabNode) -> str:
        return f"host={node.host} port={node.port} user={REPLICATION_USER} application_name=%s"

    def add_standby(self, name: str, upstream: LabNode) -> LabNode:
        """Build ``name`` from a base backup of ``upstream`` and start it streaming."""
        node = self.nodes.get(name) or self._add_node(name)
        replication.ensure_slot(upstream.admin_dsn, name)
        conninfo = self.replication_conninfo(upstream) % name
        replication.base_backup(node.server, conninfo, slot=name)
        self.configure_as_standby(node, upstream)
        node.start()
        replication.wait_streaming(node.admin_dsn)
        self.save()
        return node

    def configure_as_standby(self, node: LabNode, upstream: LabNode) -> None:
        replication.configure_standby(
            node.server, self.replication_conninfo(upstream) % node.name, slot=node.name,
            extra={"port": node.port, "unix_socket_directories": str(self.directory / node.name)},
        )

    def promote(self, node: LabNode | str) -> replication.Promotion:
        """Promote ``node`` (``pg_promote``, verified: out of recovery, timeline bumped)."""
        return replication.promote(self.node(node).admin_dsn)

    def rejoin(self, node: LabNode | str, *, upstream: LabNode | str | None = None) -> None:
        """Make a stopped former primary follow ``upstream`` (the current primary) again.

        Uses ``pg_rewind`` so a diverged node (after a crash) can rejoin without a new backup.
        """
        node = self.node(node)
        up = self.node(upstream) if upstream is not None else self.primary
        node.stop("fast")
        replication.ensure_slot(up.admin_dsn, node.name)
        replication.checkpoint(up.admin_dsn)
        if node.server.controldata().get("Database cluster state") not in ("shut down", "shut down in recovery"):
            # pg_rewind needs a clean shutdown: let crash recovery finish first.
            node.server.run("postgres", "--single", "-D", node.server.data, "-c", "hot_standby=off",
                            "postgres", timeout=120)
        node.server.run("pg_rewind", "-D", node.server.data, "--source-server", up.admin_dsn,
                        "--no-sync", timeout=600)
        self.configure_as_standby(node, up)
        node.start()
        replication.wait_streaming(node.admin_dsn)

    def on_close(self, what: str, closer: Callable[[], object]) -> None:
        """Run ``closer`` first when the lab closes (e.g. an sshd started for it); failures are logged."""
        self._closers.append((what, closer))

    @property
    def bouncers(self) -> list[LabBouncer]:
        """Every PgBouncer of the lab: the default one, then those ``add_pgbouncer`` made."""
        return ([self.pgbouncer] if self.pgbouncer else []) + list(self.extra_bouncers.values())

    def add_pgbouncer(self, name: str, **settings: object) -> LabBouncer:
        """Start another PgBouncer in front of the primary (see ``testing.fleet``); ``settings`` override."""
        from .fleet import add_pgbouncer

        return add_pgbouncer(self, name, settings)

    def write_inventory(self, path: str | os.PathLike[str], **options: Any) -> Path:
        """Write the CLI's INI inventory describing this lab (see ``testing.fleet.write_inventory``)."""
        from .fleet import write_inventory

        return write_inventory(self, path, **options)

    def close(self) -> None:
        """Stop everything the lab started and remove its directory (if the lab made it).

        Never raises: each step that fails is logged and the rest still runs.
        """
        for what, closer in reversed(self._closers):
            _quietly(closer, what)
        for extra in self.extra_bouncers.values():
            _quietly(extra.stop, f"stop pgbouncer {extra.name}")
        if self.pgbouncer is not None:
            _quietly(self.pgbouncer.stop, "stop pgbouncer")
        for node in self.nodes.values():
            _quietly(functools.partial(node.server.stop, "immediate", timeout=20), f"stop {node.name}")
            _quietly(node.kill, f"kill {node.name}")
        if self.owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def destroy(self) -> None:
        """``close()`` and remove the directory even if the lab did not create it."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- state on disk -----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Each server with its observed role and its ``postgresql://`` URL."""
        servers = [{"name": n.name, "role": n.role(), "url": n.url, "port": n.port} for n in self.nodes.values()]
        if self.pgbouncer is not None:
            servers.append({"name": "pgbouncer", "role": f"pgbouncer -> {self.pgbouncer.target}",
                            "url": self.pgbouncer.url, "port": self.pgbouncer.port})
        return {"directory": str(self.directory), "servers": servers}

    def save(self) -> None:
        state = {
            "os_user": self.os_user,
            "bin": str(self.bin),
            "nodes": {n.name: n.port for n in self.nodes.values()},
            "pgbouncer": {"port": self.pgbouncer.port, "target": self.pgbouncer.target} if self.pgbouncer else None,
        }
        self.hostos.write_text_atomic(self.directory / STATE_FILE, json.dumps(state, indent=2) + "\n")

    @classmethod
    def attach(cls, directory: str | os.PathLike[str]) -> Lab:
        """The lab described by ``directory/lab.json`` (started by another process)."""
        path = Path(directory) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise OpsError(f"no lab in {directory} (no {STATE_FILE}); start one with: srht-readonly lab up") from None
        lab = cls(directory, os_user=state["os_user"], pg_bin=state["bin"])
        for name, port in state["nodes"].items():
            lab.nodes[name] = LabNode(lab, name, port)
        if state.get("pgbouncer"):
            lab.pgbouncer = LabBouncer(lab, state["pgbouncer"]["port"], state["pgbouncer"]["target"])
        return lab


def _hba() -> str:
    return (
        "# srht-readonly lab: loopback only, trust (nothing here is reachable from elsewhere)\n"
        "local all all trust\n"
        f"host all all {HOST}/32 trust\n"
        f"host replication {REPLICATION_USER} {HOST}/32 trust\n"
    )


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _quietly(fn: Callable[[], object], what: str) -> None:
    try:
        fn()
    except Exception as exc:  # teardown must go on
        logger.warning("lab teardown: %s failed: %s", what, exc)

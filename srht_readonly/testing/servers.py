"""The lab's servers: ``LabNode`` (one PostgreSQL server) and ``LabBouncer`` (one PgBouncer), on loopback.

Each is a thin wrapper over the ``ops`` primitives an operator's commands use
(``ops.postgres.PostgresServer``, ``ops.pgbouncer``, ``ops.console.Admin``), placed in the
``Lab``'s directory and run as its OS user.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..ops import sql
from ..ops.console import Admin
from ..ops.errors import OpsError
from ..ops.pgbouncer import PgBouncerProcess, render_config, repoint
from ..ops.postgres import PostgresServer
from ..ops.versions import Pg

if TYPE_CHECKING:
    from .lab import Lab

__all__ = ["APP_DB", "APP_USER", "HOST", "NODE_SETTINGS", "REPLICATION_USER", "WAL_KEEP_MB", "LabBouncer", "LabNode",
           "node_settings"]

HOST = "127.0.0.1"
APP_USER = "srht"
APP_DB = "srht"
REPLICATION_USER = "replicator"

# Settings that make a failover drill behave like production, minus durability across an OS
# crash (nothing here survives a reboot anyway). Those named differently on some majors are
# added by ``node_settings``.
NODE_SETTINGS: dict[str, object] = {
    "listen_addresses": HOST,
    "wal_level": "replica",
    "wal_log_hints": True,
    "hot_standby": True,
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "max_connections": 200,
    "shared_buffers": "32MB",
    "fsync": False,
    "full_page_writes": True,
    "logging_collector": False,
    "log_line_prefix": "%m [%p] ",
    "wal_receiver_status_interval": "1s",
    "hot_standby_feedback": True,
}
#: WAL kept for the standbys beyond what their slots hold (wal_keep_size, or wal_keep_segments on 12).
WAL_KEEP_MB = 64


def node_settings(pg: Pg) -> dict[str, object]:
    """``NODE_SETTINGS`` plus the settings whose name depends on the major (``versions.Pg``)."""
    return {**NODE_SETTINGS, **pg.wal_keep(WAL_KEEP_MB)}


class LabNode:
    """One PostgreSQL server of the lab, reachable on ``127.0.0.1:port``.

    It runs the PostgreSQL in ``bin`` (default: the lab's), kept in ``server.bin``: after a major
    upgrade of this node alone it differs from the other's (``Lab.set_bin``).
    """

    def __init__(self, lab: Lab, name: str, port: int, *, bin: str | os.PathLike[str] | None = None) -> None:
        self.lab = lab
        self.name = name
        self.host = HOST
        self.port = port
        self.server = PostgresServer(
            lab.directory / name / "data", bin=Path(bin) if bin is not None else lab.bin, host=lab.hostos,
            os_user=lab.os_user, log=lab.directory / name / "postgres.log",
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
            # docs/facts.md: without it, a query sent to a node behind a black hole hangs ~15 min.
            "tcp_user_timeout": 2000,
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

"""The inventory at run time: a host object per machine, a ``PostgresServer`` per node.

One ``Cluster`` lives for one command. It opens ssh connections only when something needs them
and closes them all together (``with Cluster(inventory) as cluster:``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path

import psycopg2.extensions

from .errors import Refused, ToolMissing
from .inventory import BouncerSpec, Inventory, NodeSpec
from .postgres import PostgresServer, find_bin_dir
from .remote import Host, LocalHost, SshHost

logger = logging.getLogger(__name__)

SSH_CONFIG_ENV = "SRHT_READONLY_SSH_CONFIG"


class Cluster:
    """Hosts and servers of ``inventory``; ``ssh_config`` (or ``$SRHT_READONLY_SSH_CONFIG``) is given to ssh."""

    def __init__(self, inventory: Inventory, *, ssh_config: str | os.PathLike[str] | None = None) -> None:
        self.inventory = inventory
        self.ssh_config = str(ssh_config or os.environ.get(SSH_CONFIG_ENV) or "") or None
        self._hosts: dict[str | None, Host] = {}
        self._servers: dict[str, PostgresServer] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, ssh: str | None) -> Host:
        """The machine reached with ``ssh`` (None: this one); one object per destination."""
        with self._lock:
            if ssh not in self._hosts:
                self._hosts[ssh] = LocalHost() if ssh is None else SshHost(ssh, ssh_config=self.ssh_config)
            return self._hosts[ssh]

    def node(self, name: str) -> NodeSpec:
        return self.inventory.node(name)

    def node_and_upstream(self, node: str, upstream: str, *, itself: str) -> tuple[NodeSpec, NodeSpec]:
        """Both nodes of a procedure that makes ``node`` follow ``upstream``; ``Refused(itself)`` if they are one."""
        if node == upstream:
            raise Refused(itself)
        return self.node(node), self.node(upstream)

    def bouncer(self, name: str) -> BouncerSpec:
        return self.inventory.pgbouncers[name]

    def node_host(self, name: str) -> Host:
        return self.host(self.node(name).ssh)

    def server(self, name: str) -> PostgresServer:
        """The node's data directory and postmaster, driven on its own host as its OS user."""
        if name not in self._servers:
            spec = self.node(name)
            host = self.node_host(name)
            data = Path(spec.data)
            # pg_ctl needs somewhere to send the server's output: next to the data directory.
            self._servers[name] = PostgresServer(
                data, bin=self._bin_dir(spec, host), host=host,  # type: ignore[arg-type]
                os_user=spec.os_user, log=data.with_name(f"{data.name}.log"),
            )
        return self._servers[name]

    def use_bin(self, name: str, bin_dir: str | os.PathLike[str]) -> None:
        """From now on drive ``name`` with the PostgreSQL in ``bin_dir`` (after a major upgrade), for this command."""
        nodes = dict(self.inventory.nodes)
        nodes[name] = dataclasses.replace(nodes[name], bin=str(bin_dir))
        self.inventory = dataclasses.replace(self.inventory, nodes=nodes)
        self._servers.pop(name, None)

    def _bin_dir(self, spec: NodeSpec, host: Host) -> Path:
        if isinstance(host, LocalHost):
            return find_bin_dir(spec.bin)
        if spec.bin:
            return Path(spec.bin)
        found = host.run(["sh", "-c", "ls -d /usr/lib/postgresql/*/bin /usr/libexec/postgresql* 2>/dev/null | "
                                      "sort -V | tail -n 1"], check=False).stdout.strip()
        if not found:
            raise ToolMissing("pg_ctl", "postgresql", f"/usr/lib/postgresql/*/bin on {host.name}; set bin =")
        return Path(found)

    def replication_conninfo(self, upstream: str, application_name: str, *, password: bool = True) -> str:
        """How ``application_name``'s node streams from ``upstream``: its target, the replication user."""
        target = self.node(upstream).target
        params = {"host": target["host"], "port": target["port"], "user": self.inventory.replication.user,
                  "application_name": application_name}
        secret = self.inventory.replication.password() if password else None
        if secret is not None:
            params["password"] = secret
        return psycopg2.extensions.make_dsn(**params)

    def rewind_source(self, upstream: str) -> tuple[str, dict[str, str]]:
        """A superuser conninfo of ``upstream`` as other nodes reach it, and the env carrying its password."""
        params = _dsn_params(self.node(upstream).dsn)
        params.update(self.node(upstream).target)
        env = {}
        if "password" in params:
            env["PGPASSWORD"] = params.pop("password")
        return psycopg2.extensions.make_dsn(**params), env

    def close(self) -> None:
        """Close every ssh connection opened; never raises."""
        for host in list(self._hosts.values()):
            try:
                host.close()
            except Exception as exc:  # closing must go on
                logger.warning("closing %s: %s", host.name, exc)
        self._hosts.clear()


def _dsn_params(dsn: str) -> dict[str, str]:
    return dict(psycopg2.extensions.parse_dsn(dsn))

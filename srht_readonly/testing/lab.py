"""The lab: a primary, a streaming hot standby and a PgBouncer on free loopback ports (its lifecycle and state).

The servers themselves are ``servers.LabNode`` and ``servers.LabBouncer``; the inventory that
describes a lab is written by ``inventory.write_inventory``.

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

from ..ops import replication, rewind, sql
from ..ops.errors import OpsError
from ..ops.ports import free_port
from ..ops.postgres import find_bin_dir
from ..ops.remote import LocalHost
from .backup import LabBarman
from .inventory import write_inventory
from .servers import APP_DB, APP_USER, HOST, REPLICATION_USER, LabBouncer, LabNode, node_settings

logger = logging.getLogger(__name__)

NODE_NAMES = ("remilia", "konpaku")
STATE_FILE = "lab.json"


class Lab:
    """A primary, a hot standby and a PgBouncer in ``directory`` (a new temporary one if None).

    ``with Lab() as lab:`` starts everything and tears it all down on exit, even after an error.
    ``os_user`` runs the servers (``postgres`` when we are root, else ourselves). ``pg_bin`` is
    the directory of the PostgreSQL every node starts with (``find_bin_dir``'s default when
    None); each node keeps its own afterwards (``node.server.bin``, ``set_bin``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        os_user: str | None = None,
        pg_bin: str | os.PathLike[str] | None = None,
        standby: bool = True,
        pgbouncer: bool = True,
        backup: bool = False,
    ) -> None:
        self.owns_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="srht-lab-")).resolve()
        self.os_user = os_user or ("postgres" if os.geteuid() == 0 else _me())
        self.bin = find_bin_dir(pg_bin)
        self.hostos = LocalHost()
        self.with_standby = standby
        self.with_pgbouncer = pgbouncer
        self.with_backup = backup
        self.barman: LabBarman | None = None
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
        # Checksums off on every major (18's initdb turns them on): the lab is the same cluster on
        # each, and pg_upgrade, which needs old and new to agree, can move a node between them.
        primary.server.initdb(checksums=False)
        primary.server.set_settings({**node_settings(primary.server.pg()), "port": primary.port,
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
        if self.with_backup:
            say("start barman: streaming WAL, first base backup")
            self.start_backup()
            self.timings["backup"] = time.monotonic() - t0
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
        node = LabNode(self, name, free_port(), bin=self.bin)
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
        """Build ``name`` from a base backup of ``upstream`` and start it streaming.

        The copy is of ``upstream``'s major, so ``name`` runs ``upstream``'s binaries from now on.
        """
        node = self.nodes.get(name) or self._add_node(name)
        node.server.bin = upstream.server.bin
        replication.ensure_slot(upstream.admin_dsn, name)
        conninfo = self.replication_conninfo(upstream) % name
        replication.base_backup(node.server, conninfo, slot=name, sync=False)  # a throwaway copy
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

        Uses ``pg_rewind`` (``ops.rewind``, as ``srht-readonly demote`` does) so a diverged node
        (after a crash) can rejoin without a new backup.
        """
        node = self.node(node)
        up = self.node(upstream) if upstream is not None else self.primary
        node.stop("fast")
        replication.ensure_slot(up.admin_dsn, node.name)
        if not rewind.is_clean(node.server.controldata()):
            rewind.finish_crash_recovery(node.server, timeout=120)
        rewind.rewind(node.server, up.admin_dsn, checkpoint_dsn=up.admin_dsn, sync=False, timeout=600)
        self.configure_as_standby(node, up)
        node.start()
        replication.wait_streaming(node.admin_dsn)

    def set_bin(self, node: LabNode | str, bin_dir: str | os.PathLike[str]) -> None:
        """Run ``node`` with the PostgreSQL in ``bin_dir`` from now on (after a major upgrade of it), and save
        that in lab.json, so ``Lab.attach`` and ``lab down`` drive it with the right binaries."""
        node = self.node(node)
        node.server.bin = find_bin_dir(bin_dir)
        self.save()

    def on_close(self, what: str, closer: Callable[[], object]) -> None:
        """Run ``closer`` first when the lab closes (e.g. an sshd started for it); failures are logged."""
        self._closers.append((what, closer))

    @property
    def bouncers(self) -> list[LabBouncer]:
        """Every PgBouncer of the lab: the default one, then those ``add_pgbouncer`` made."""
        return ([self.pgbouncer] if self.pgbouncer else []) + list(self.extra_bouncers.values())

    def add_pgbouncer(self, name: str, **settings: object) -> LabBouncer:
        """Start PgBouncer ``name`` (own directory and port) in front of the current primary; ``settings`` override."""
        if name in self.extra_bouncers or name == "pgbouncer":
            raise ValueError(f"the lab already has a PgBouncer called {name}")
        bouncer = LabBouncer(self, free_port(), self.primary.name, name=name, settings=settings)
        bouncer.write_config()
        bouncer.start()
        self.extra_bouncers[name] = bouncer
        return bouncer

    def start_backup(self) -> LabBarman:
        """A real Barman for the primary (``testing.backup.LabBarman``), and a directory for ``past`` instances
        on another file system than the lab's data (``/dev/shm``), as production should have it."""
        self.barman = LabBarman(self, past_dir=Path("/dev/shm") / f"srht-readonly-past-{self.directory.name}")
        self.hostos.make_dir(self.barman.past_dir, owner=self.os_user, mode=0o755)
        self.barman.start()
        self.save()
        return self.barman

    def write_inventory(self, path: str | os.PathLike[str], **options: Any) -> Path:
        """Write the CLI's INI inventory describing this lab (see ``testing.inventory.write_inventory``)."""
        return write_inventory(self, path, **options)

    def close(self) -> None:
        """Stop everything the lab started and remove its directory (if the lab made it).

        Never raises: each step that fails is logged and the rest still runs.
        """
        for what, closer in reversed(self._closers):
            _quietly(closer, what)
        if self.barman is not None:
            _quietly(self.barman.stop, "stop barman and the instances of the past")
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
        servers = [{"name": n.name, "role": n.role(), "url": n.url, "port": n.port, "bin": str(n.server.bin)}
                   for n in self.nodes.values()]
        if self.pgbouncer is not None:
            servers.append({"name": "pgbouncer", "role": f"pgbouncer -> {self.pgbouncer.target}",
                            "url": self.pgbouncer.url, "port": self.pgbouncer.port})
        return {"directory": str(self.directory), "servers": servers}

    def save(self) -> None:
        state = {
            "os_user": self.os_user,
            "bin": str(self.bin),
            "nodes": {n.name: {"port": n.port, "bin": str(n.server.bin)} for n in self.nodes.values()},
            "pgbouncer": {"port": self.pgbouncer.port, "target": self.pgbouncer.target} if self.pgbouncer else None,
            "backup": {"past_dir": str(self.barman.past_dir)} if self.barman else None,
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
        for name, node in state["nodes"].items():
            if isinstance(node, int):  # lab.json before nodes had binaries of their own
                node = {"port": node}
            lab.nodes[name] = LabNode(lab, name, node["port"], bin=node.get("bin") or lab.bin)
        if state.get("pgbouncer"):
            lab.pgbouncer = LabBouncer(lab, state["pgbouncer"]["port"], state["pgbouncer"]["target"])
        if state.get("backup"):
            lab.barman = LabBarman(lab, past_dir=Path(state["backup"]["past_dir"]), started=True)
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

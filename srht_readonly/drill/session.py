"""Where a drill runs: the embedded lab with the registered stand-in services, or an inventory.

Both give a ``runner.Fleet`` (procedures from ``ops``, traffic through the PgBouncers) and the
traffic sources, and both tear down everything they started, whatever happened.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg2.extensions

from ..ops.cluster import Cluster
from ..ops.etcd import FleetLock
from ..ops.inventory import load
from ..ops.lock import OperatorLock, lock_path
from .config import drill_config
from .probes import ProbeSource
from .procedures import InventoryProcedures
from .runner import Fleet, TrafficSource
from .sabotage import SABOTAGES
from .services import DrillEnvironment, registered

Say = Callable[[str], None]


@dataclass
class Setting:
    """A fleet ready to drill, the traffic sources, and a line describing where it runs."""

    fleet: Fleet
    sources: Sequence[TrafficSource]
    environment: str
    major_bin: str | None = None  # where the major-upgrade scenario can be played: the new major's bindir
    past: bool = False  # a backup engine runs: the past-data scenario can be played
    throttle: bool = True  # every node runs on this machine: the soft-outage scenario can throttle them


@contextlib.contextmanager
def local(*, load_name: str, duration: float, services: bool = True, sabotage: str | None = None,
          pg_bin: str | None = None, major_bin: str | None = None, backup: bool = True,
          say: Say = lambda _m: None) -> Iterator[Setting]:
    """A fresh lab (primary, hot standby, PgBouncer) and the stand-in services, all removed afterwards.

    ``sabotage``: the part to break on purpose (``drill.sabotage``); ``pg_bin``: the lab's binaries;
    ``major_bin``: the new major for the major-upgrade scenario (the lab may drop whatever non-stock
    column options it has); ``backup``: run Barman for the past-data scenario.
    """
    from ..testing.lab import Lab

    scratch = Path(tempfile.mkdtemp(prefix="srht-drill-"))
    try:
        with contextlib.ExitStack() as stack:
            lab = Lab(pg_bin=pg_bin, backup=backup)
            stack.callback(lab.close)  # before start(): an interrupted base backup leaves nothing behind
            say("starting the lab: primary, hot standby (pg_basebackup), PgBouncer")
            lab.start(progress=lambda m: say(f"  {m}"))
            cluster = stack.enter_context(Cluster(load(lab.write_inventory(scratch / "inventory.ini"))))
            assert lab.pgbouncer is not None
            procedures = InventoryProcedures(cluster, sabotage=sabotage, major_bin=major_bin,
                                             drop_column_options=True, app_dsn=lab.pgbouncer.dsn, own_etcd=True)
            fleet = Fleet(procedures, [lab.pgbouncer.dsn], lambda node: lab.node(node).dsn)
            sources: list[TrafficSource] = []
            if services:
                broken = SABOTAGES[sabotage].service if sabotage else None
                env = DrillEnvironment(lab.pgbouncer.url, scratch / "services", load_name, duration, sabotage,
                                       only=frozenset({broken}) if broken else None)
                env.directory.mkdir()
                for name, factory in registered().items():
                    say(f"starting services: {name}")
                    made = factory(env)
                    stack.callback(made.close)
                    sources += made.sources
            stack.callback(procedures.close)  # first: a PgBouncer left paused holds the services' clients
            names = ", ".join(s.name for s in sources) or "none (database traffic only)"
            pg = lab.primary.server.run("postgres", "--version").stdout.strip()
            yield Setting(fleet, sources, f"embedded lab in {lab.directory}: {pg}; services: {names}", major_bin,
                          backup, throttle=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def deployment(path: str | Path, *, ssh_config: str | Path | None = None,
               sabotage: str | None = None) -> Iterator[Setting]:
    """The hosts of the inventory at ``path``, its ``[drill]`` traffic and ``[probe NAME]`` probes.

    ``sabotage``: a fleet sabotage only (``no-resume``, ``slow-login-retry``).
    """
    inventory = load(path)
    config = drill_config(inventory)
    lock = OperatorLock(lock_path(inventory.path), "drill")
    lock.acquire()
    try:
        with contextlib.ExitStack() as held:
            if inventory.etcd is not None:  # the fleet-wide lock too: the drill changes the fleet
                held.enter_context(FleetLock(inventory.etcd, "drill"))
            cluster = held.enter_context(Cluster(inventory, ssh_config=ssh_config))

            def ledger_dsn(node: str) -> str:
                return psycopg2.extensions.make_dsn(cluster.node(node).dsn, dbname=config.database)

            procedures = InventoryProcedures(cluster, sabotage=sabotage, major_bin=config.major_bin,
                                             drop_column_options=config.drop_column_options,
                                             app_dsn=config.traffic[0])
            fleet = Fleet(procedures, config.traffic, ledger_dsn)
            sources = [ProbeSource(p) for p in config.probes]
            try:
                yield Setting(fleet, sources, f"inventory {inventory.path}: nodes {', '.join(inventory.nodes)}; "
                                              f"probes: {', '.join(p.name for p in config.probes) or 'none'}",
                              config.major_bin, inventory.backup is not None,
                              throttle=all(n.ssh is None for n in inventory.nodes.values()))
            finally:
                procedures.close()
    finally:
        lock.release()

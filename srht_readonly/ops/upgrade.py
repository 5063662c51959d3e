"""The plan's "Major version upgrades", as one command, with the checks a careful DBA adds.

Before the read-only window (nothing changed yet; a failure refuses):

* a primary with one streaming standby that has caught up (replay not paused, within ``max_lag``),
  every PgBouncer on the primary and not paused;
* the new binaries on both hosts, a newer major than the data's;
* every extension of every database has a control file in the new installation;
* every setting of the old configuration files is known to the new server;
* no column option stock PostgreSQL does not know (unless ``--drop-column-option`` names it);
* free disk for the method (``copy`` needs the data's size again);
* ``pg_upgrade --check`` against the running primary;
* a **rehearsal**: a schema-only copy of the primary, upgraded for real by ``pg_upgrade --link``
  in scratch directories, then removed. ``--check`` alone misses what only restoring the schema
  reveals (a patched server's own column options, for one: docs/upgrade.md).

The window, measured and printed:

1. read-only failover of the fleet to the standby;
2. the column options named by ``--drop-column-option`` removed on the primary;
3. fast-stop the primary; wait until the standby has replayed its shutdown checkpoint (so the
   standby holds exactly what the primary held), then pause replay there: the frozen copy to fall
   back on;
4. ``pg_upgrade`` (``link``, ``clone`` or ``copy``), the new cluster swapped in at the data
   directory's path (the old one kept beside it), start on the new binaries, ``vacuumdb
   --analyze-in-stages``, sanity check against the frozen standby (databases, extensions, row
   counts of the largest tables);
5. the fleet back to the upgraded primary: writable.

Both repoints hold a server of each busy pool across the RELOAD (``Fleet.keep_pools``), so that
PgBouncer does not turn clients away when the RELOAD closes a login in progress.

After the window: the standby rebuilt from scratch on the new major (``standby prepare`` with the
new binaries; its old data directory is moved aside, not deleted).

If ``pg_upgrade`` fails (or a signal arrives) before the new cluster was started, everything is
put back: the old primary starts on its old binaries, replay resumes, the fleet returns to it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import interrupts, pgupgrade, sql
from .cluster import Cluster
from .errors import OpsError, PartlyDone, Refused
from .failover import check_failover, run_failover
from .fleet import Fleet
from .observe import observe_nodes, primary_and_standby
from .postgres import PostgresServer
from .standby import check_prepare, run_prepare
from .switchover import MAX_LAG, stop_primary

__all__ = ["MajorPlan", "MajorResult", "check_major_upgrade", "run_major_upgrade"]

logger = logging.getLogger(__name__)

Say = Callable[[str], None]

REHEARSAL_PORT = 50434
#: Tables per database whose exact row counts the sanity check compares (the largest ones).
LARGEST_TABLES = 5


@dataclass
class MajorPlan:
    primary: str
    standby: str
    old_major: int
    new_major: int
    old_bin: str
    new_bin: str
    method: str
    drop_column_options: dict[str, int]
    check_seconds: float
    warnings: list[str] = field(default_factory=list)
    backup_server: str | None = None  # [backup]'s Barman server, which stops streaming at the upgrade

    def title(self) -> str:
        return (f"upgrade {self.primary} from PostgreSQL {self.old_major} to {self.new_major} "
                f"(pg_upgrade --{self.method}), then rebuild {self.standby}")

    def steps(self) -> list[str]:
        p, s = self.primary, self.standby
        steps = [f"checked: pg_upgrade --check and a schema-only rehearsal passed ({self.check_seconds:.1f} s)",
                 f"before the window: initdb the new cluster beside {p}'s data directory ({self.new_bin})",
                 f"window starts: every PgBouncer points at {s} (read-only)"]
        if self.drop_column_options:
            steps.append(f"remove column options {', '.join(self.drop_column_options)} from {p}'s catalogs "
                         f"({sum(self.drop_column_options.values())} columns)")
        steps += [f"fast-stop {p}; wait until {s} replayed its shutdown checkpoint; pause replay on {s} "
                  f"(the frozen copy to fall back on)",
                  f"pg_upgrade --{self.method}; swap the new cluster in at {p}'s data path (old one kept beside it)",
                  f"start {p} on PostgreSQL {self.new_major}; vacuumdb --all --analyze-in-stages",
                  f"sanity check {p} against {s}: databases, extensions, row counts of the largest tables",
                  f"window ends: every PgBouncer points at {p} (writable)",
                  f"rebuild {s} on PostgreSQL {self.new_major} (standby prepare; its old data moved aside)",
                  f"afterwards: set bin = {self.new_bin} for {p} and {s} in the inventory"]
        return steps


@dataclass
class MajorResult:
    primary: str
    standby: str
    old_major: int
    new_major: int
    method: str
    read_only_seconds: float
    phases: dict[str, float]
    old_data_kept: str
    standby_data_kept: str | None
    sanity: dict[str, object]
    new_bin: str
    total_seconds: float
    backup_server: str | None = None

    def text(self) -> str:
        return (f"{self.primary} is the primary on PostgreSQL {self.new_major} (was {self.old_major}), "
                f"{self.standby} streams from it on {self.new_major}. Read-only window "
                f"{self.read_only_seconds:.1f} s (pg_upgrade --{self.method} "
                f"{self.phases.get('pg_upgrade', 0):.1f} s), "
                f"{self.total_seconds:.1f} s in all.\nOld data kept at {self.old_data_kept}"
                + (" (link mode: never start it; delete it once satisfied)" if self.method == "link" else "")
                + (f" and {self.standby_data_kept}" if self.standby_data_kept else "")
                + f".\nNow set bin = {self.new_bin} for {self.primary} and {self.standby} in the inventory."
                + (f"\n{backup_warning(self.backup_server, self.new_major)}." if self.backup_server else ""))


def check_major_upgrade(cluster: Cluster, fleet: Fleet, to_bin: str, *, method: str = "link",
                        max_lag: int = MAX_LAG, drop_column_options: tuple[str, ...] = (),
                        say: Say = logger.info) -> MajorPlan:
    """Refuse (nothing changed) unless everything the module docstring lists holds."""
    if method not in pgupgrade.METHODS:
        raise Refused(f"--method must be one of {', '.join(pgupgrade.METHODS)}")
    started = time.monotonic()
    states = observe_nodes(cluster.inventory)
    p, s = primary_and_standby(states, what="a major upgrade",
                               why="the upgrade needs one to serve reads during the window and to fall back on")
    st = states[s]
    if st.replay_paused:
        raise Refused(f"{s} is not caught up: its replay is paused (SELECT pg_wal_replay_resume() on {s})")
    if st.lag_bytes is None or st.lag_bytes > max_lag:
        raise Refused(f"{s} is not caught up: {st.lag_bytes if st.lag_bytes is not None else 'unknown'} bytes behind "
                      f"{p} (--max-lag {max_lag // 2**20} MB); wait, or find out why it lags")
    fleet.open()
    fleet.require_all()
    wrong = {n: ("paused" if b.paused else f"points at {b.target}") for n, b in fleet.observe().items()
             if b.paused or b.target != p}
    if wrong:
        raise Refused("every PgBouncer must point at the primary first: "
                      + "; ".join(f"{n} {w}" for n, w in wrong.items()))
    server, sserver = cluster.server(p), cluster.server(s)
    new_bin = Path(to_bin)
    old_major, new_major = pgupgrade.major_of_data(server), pgupgrade.major_of_bin(server, new_bin)
    if new_major <= old_major:
        raise Refused(f"{new_bin} holds PostgreSQL {new_major}, and {p} runs {old_major}: not a major upgrade "
                      f"(srht-readonly upgrade --minor changes binaries within one major)")
    if pgupgrade.major_of_bin(sserver, new_bin) != new_major:
        raise Refused(f"{new_bin} on {s}'s host is not PostgreSQL {new_major}; install it there too")
    dsn = cluster.node(p).dsn
    problems = []
    if missing := pgupgrade.missing_extensions(dsn, server, new_bin):
        problems.append("extensions missing from the new installation: " + "; ".join(
            f"{db}: {', '.join(exts)}" for db, exts in missing.items()) + " (install them for the new major, or "
            "DROP EXTENSION where unused)")
    if unknown := pgupgrade.unknown_settings(server, new_bin):
        problems.append(f"settings PostgreSQL {new_major} does not know, in {p}'s configuration files: "
                        f"{', '.join(unknown)} (remove or rename them first)")
    foreign = pgupgrade.foreign_column_options(dsn)
    if undropped := sorted(set(foreign) - set(drop_column_options)):
        problems.append(
            f"column options stock PostgreSQL does not know, on {sum(foreign[k] for k in undropped)} columns: "
            f"{', '.join(undropped)}. PostgreSQL {new_major} rejects them while restoring the schema, half-way "
            f"through pg_upgrade (pg_upgrade --check does not see it). If they only carry this build's own "
            f"bookkeeping, pass " + " ".join(f"--drop-column-option {k}" for k in undropped)
            + " to remove them from the catalogs at the start of the window")
    if shortfall := pgupgrade.disk_shortfall(server, method):
        needed, free = shortfall
        problems.append(f"not enough disk for --method {method} beside {server.data}: about {needed // 2**20} MB "
                        f"needed, {free // 2**20} MB free (--method link needs almost none)")
    if problems:
        raise Refused("refusing the major upgrade; nothing was changed:\n- " + "\n- ".join(problems))
    say(f"pg_upgrade --check against {p}, then a schema-only rehearsal")
    _check_and_rehearse(cluster, p, new_bin, tuple(k for k in drop_column_options if k in foreign))
    plan = MajorPlan(p, s, old_major, new_major, str(server.bin), str(new_bin), method,
                     {k: foreign[k] for k in drop_column_options if k in foreign}, time.monotonic() - started)
    if method == "link":
        plan.warnings.append(f"--method link: once {p} has started on {new_major}, its old data directory must never "
                             f"be started again; until {s} is rebuilt the fallback is {s} (paused, PostgreSQL "
                             f"{old_major})")
    if cluster.inventory.backup is not None:
        plan.backup_server = cluster.inventory.backup.server
        plan.warnings.append(backup_warning(plan.backup_server, new_major))
    return plan


def backup_warning(server: str, new_major: int) -> str:
    """What the upgrade leaves for the operator when a backup engine is configured (docs/upgrade.md)."""
    return (f"[backup]: Barman's server {server} follows the cluster being replaced; after the upgrade (a new "
            f"system identifier) its WAL streaming stops and the recoverable window ends there. Give "
            f"PostgreSQL {new_major} a Barman server of its own, then set server = in [backup] "
            f"(docs/upgrade.md, \"Afterwards: the backups\")")


def _check_and_rehearse(cluster: Cluster, p: str, new_bin: Path, drop: tuple[str, ...]) -> None:
    """``pg_upgrade --check`` on the live primary, then a real upgrade of a schema-only copy; scratch removed."""
    server = cluster.server(p)
    dsn = cluster.node(p).dsn
    shape = pgupgrade.shape_of(dsn, server)
    new_major = pgupgrade.major_of_bin(server, new_bin)
    scratch_old_dir = server.data.with_name(f"{server.data.name}.rehearsal-old")
    scratch_new_dir = server.data.with_name(f"{server.data.name}.rehearsal-new")
    _remove(server, scratch_old_dir, scratch_new_dir)
    try:
        scratch_new = pgupgrade.init_new_cluster(
            PostgresServer(scratch_old_dir, bin=server.bin, host=server.host, os_user=server.os_user),
            new_bin, scratch_new_dir, shape, copy_config=False, major=new_major)
        live = pgupgrade.PgUpgrade(server, scratch_new, superuser=shape.superuser)
        live.check(live_port=int(cluster.node(p).port))
        live.cleanup()
        scratch_old = pgupgrade.rehearsal_copy(server, dsn, scratch_old_dir, shape, port=REHEARSAL_PORT)
        if drop:
            pgupgrade.drop_column_options(scratch_old.dsn, drop)
        scratch_old.stop()
        trial = pgupgrade.PgUpgrade(scratch_old.server, scratch_new, superuser=shape.superuser)
        try:
            trial.run("link")
        except OpsError as exc:
            raise Refused(f"the rehearsal failed: pg_upgrade of a schema-only copy of {p} did not complete, so the "
                          f"real one would fail half-way through the read-only window; nothing was changed.\n{exc}") \
                from exc
        finally:
            trial.cleanup()
    finally:
        _remove(server, scratch_old_dir, scratch_new_dir)


def _remove(server: PostgresServer, *paths: Path) -> None:
    for path in paths:
        leftover = PostgresServer(path, bin=server.bin, host=server.host, os_user=server.os_user)
        if server.host.exists(path / "postmaster.pid"):
            leftover.stop("immediate")
        server.host.run(["rm", "-rf", str(path)], user=server.os_user, check=False, timeout=600)


def run_major_upgrade(cluster: Cluster, fleet: Fleet, plan: MajorPlan, *, say: Say = logger.info,
                      window: Callable[[str], None] | None = None) -> MajorResult:
    """Carry out ``plan`` (see the module docstring); every phase timed.

    ``window("read-only")`` is called once every PgBouncer points at the standby (before the
    primary is touched), ``window("closing")`` just before they are pointed back (from then on a
    write may be taken), ``window("writable")`` once they all point at the upgraded primary: the
    drill notes the states there, and may hold the first one.
    """
    return _Major(cluster, fleet, plan, say, window or (lambda _state: None)).run()


class _Major:
    def __init__(self, cluster: Cluster, fleet: Fleet, plan: MajorPlan, say: Say,
                 window: Callable[[str], None]) -> None:
        self.cluster, self.fleet, self.plan, self.say, self.window = cluster, fleet, plan, say, window
        self.p, self.s = plan.primary, plan.standby
        self.phases: dict[str, float] = {}
        self.server = cluster.server(self.p)
        self.new: PostgresServer | None = None
        self.window_start: float | None = None

    def _timed(self, name: str, fn: Callable[[], object]) -> object:
        t = time.monotonic()
        try:
            return fn()
        finally:
            self.phases[name] = round(time.monotonic() - t, 3)

    def run(self) -> MajorResult:
        started = time.monotonic()
        p, s, plan = self.p, self.s, self.plan
        target = pgupgrade.upgrading_dir(self.server, plan.new_major)
        _remove(self.server, target)
        shape = pgupgrade.shape_of(self.cluster.node(p).dsn, self.server)
        self.say(f"initdb the new cluster at {target}")
        self.new = pgupgrade.init_new_cluster(self.server, Path(plan.new_bin), target, shape, major=plan.new_major)
        self.window_start = time.monotonic()
        try:
            self.say(f"read-only window starts: every PgBouncer to {s}")
            self._timed("failover", lambda: run_failover(self.cluster, self.fleet,
                                                         check_failover(self.cluster, self.fleet, s), keep_pools=True))
            self.window("read-only")
            if plan.drop_column_options:
                changed = pgupgrade.drop_column_options(self.cluster.node(p).dsn, plan.drop_column_options)
                self.say(f"removed column options {', '.join(plan.drop_column_options)} from {changed} columns")
            self.say(f"stopping {p}; {s} replays its shutdown checkpoint, then pauses")
            self._timed("stop_and_freeze", self._stop_and_freeze)
            self.say(f"pg_upgrade --{plan.method}")
            upgrade = pgupgrade.PgUpgrade(self.server, self.new, superuser=shape.superuser)
            with interrupts.shielded() as signals:  # never leave pg_upgrade half-way on a signal: it ends first
                self.phases["pg_upgrade"] = round(upgrade.run(plan.method), 3)
            upgrade.cleanup()
            if signals:
                raise interrupts.Interrupted(signals[0])
        except BaseException as exc:
            with interrupts.shielded():
                self._put_back(exc)
            raise
        kept = pgupgrade.swap_in(self.server, self.new, plan.old_major)
        self.cluster.use_bin(p, plan.new_bin)
        self.server = self.cluster.server(p)
        try:
            self.say(f"starting {p} on PostgreSQL {plan.new_major}")
            self._timed("start", lambda: self.server.start(timeout=300))
            conninfo, env = self.cluster.rewind_source(p)
            self.say("vacuumdb --all --analyze-in-stages")
            self.phases["analyze"] = round(pgupgrade.analyze_in_stages(self.server, conninfo, env), 3)
            sanity = self._timed("sanity", self._sanity)
            self.say(f"read-only window ends: every PgBouncer back to {p}")
            self.window("closing")
            self._timed("failback", lambda: run_failover(self.cluster, self.fleet,
                                                         check_failover(self.cluster, self.fleet, p), keep_pools=True))
            self.window("writable")
        except OpsError as exc:
            raise PartlyDone(
                f"{p} was upgraded (data swapped in, old data kept at {kept}) but the window could not be closed: "
                f"{exc}\nThe fleet stays read-only on {s} (paused, PostgreSQL {plan.old_major}). Fix {p} and run "
                f"`srht-readonly failover --to {p}`, or fall back: `srht-readonly promote {s}` after "
                f"SELECT pg_wal_replay_resume() on {s}",
                {p: f"PostgreSQL {plan.new_major}, data at its path", s: "paused standby serving reads"}) from exc
        read_only = time.monotonic() - self.window_start
        self.say(f"read-only for {read_only:.1f} s; rebuilding {s} on PostgreSQL {plan.new_major}")
        sserver = self.cluster.server(s)
        self.cluster.use_bin(s, plan.new_bin)
        # PgBouncer keeps a server connection to the old target until it is released: stop the standby only
        # once none is left (Fleet.drain, bounded).
        left = self.fleet.drain(self.cluster.node(s))
        if left:
            self.say(f"server connections to {s} still open after 10 s ({left}); stopping it anyway")
        try:
            sserver.stop("fast")
            prepared = self._timed("rebuild_standby",
                                   lambda: run_prepare(self.cluster, check_prepare(self.cluster, s, p, force=True)))
        except OpsError as exc:
            raise PartlyDone(f"{p} is the writable primary on PostgreSQL {plan.new_major}, but rebuilding {s} failed: "
                             f"{exc}\nRun: srht-readonly standby prepare {s} --from {p} --force (with bin = "
                             f"{plan.new_bin} for {s} in the inventory)",
                             {p: "primary, upgraded", s: "not streaming"}) from exc
        return MajorResult(p, s, plan.old_major, plan.new_major, plan.method, round(read_only, 3), self.phases,
                           str(kept), getattr(prepared, "moved_aside", None), sanity,  # type: ignore[arg-type]
                           plan.new_bin, round(time.monotonic() - started, 3), plan.backup_server)

    def _stop_and_freeze(self) -> None:
        control = stop_primary(self.server)
        lsn = control["Latest checkpoint location"]
        sdsn = self.cluster.node(self.s).dsn
        sql.wait_until(lambda: sql.query_one(sdsn, "SELECT pg_last_wal_replay_lsn() > %s::pg_lsn", (lsn,))[0],
                       timeout=60, what=f"{self.s} to replay {self.p}'s shutdown checkpoint {lsn}")
        sql.execute(sdsn, "SELECT pg_wal_replay_pause()")
        sql.wait_until(lambda: sql.query_one(sdsn, "SELECT pg_is_wal_replay_paused()")[0], timeout=30,
                       what=f"{self.s} to pause replay")

    def _sanity(self) -> dict[str, object]:
        """The upgraded primary holds what the frozen standby holds: databases, extensions, largest tables' rows."""
        pdsn, sdsn = self.cluster.node(self.p).dsn, self.cluster.node(self.s).dsn
        dbs_p, dbs_s = pgupgrade.databases(pdsn), pgupgrade.databases(sdsn)
        problems = [] if dbs_p == dbs_s else [f"databases differ: {dbs_p} vs {dbs_s}"]
        counted = 0
        for db in dbs_s:
            if db not in dbs_p:
                continue
            pdb, sdb = pgupgrade.in_database(pdsn, db), pgupgrade.in_database(sdsn, db)
            ext = "SELECT extname FROM pg_extension ORDER BY 1"
            if sql.query(pdb, ext) != sql.query(sdb, ext):
                problems.append(f"{db}: extensions differ")
            tables = sql.query(sdb, "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
                                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                                    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                                    "ORDER BY pg_relation_size(c.oid) DESC LIMIT %s", (LARGEST_TABLES,))
            for (table,) in tables:
                count = f"SELECT count(*) FROM {table}"
                a, b = sql.query_one(pdb, count)[0], sql.query_one(sdb, count)[0]
                counted += 1
                if a != b:
                    problems.append(f"{db}.{table}: {a} rows on {self.p}, {b} on {self.s}")
        if problems:
            raise OpsError("sanity check failed: " + "; ".join(problems))
        return {"databases": len(dbs_p), "tables_counted": counted}

    def _put_back(self, exc: BaseException) -> None:
        """Before the new cluster ever started: undo everything; the fleet writable on the old primary again."""
        p, s = self.p, self.s
        self.say(f"putting everything back ({_why(exc)})")
        notes = []
        if self.new is not None:
            self.server.host.run(["rm", "-rf", str(self.new.data)], user=self.server.os_user, check=False, timeout=600)
        if pgupgrade.restore_old_control(self.server):
            notes.append("global/pg_control restored (pg_upgrade had started linking)")
        sdsn = self.cluster.node(s).dsn
        try:
            if not self.server.is_running():
                self.server.start(timeout=300)
            sql.execute(sdsn, "SELECT pg_wal_replay_resume()")
            if self.window_start is not None:
                run_failover(self.cluster, self.fleet, check_failover(self.cluster, self.fleet, p), keep_pools=True)
        except Exception as bad:  # the way back itself failed: say where things are
            raise PartlyDone(f"the upgrade failed ({_why(exc)}) and putting things back failed too: {bad}",
                             {p: "old data, old binaries", s: "may be paused; serving reads"}) from exc
        window = time.monotonic() - self.window_start if self.window_start else 0.0
        if isinstance(exc, Exception):
            raise Refused(f"the upgrade failed and everything was put back: {p} is the writable primary on "
                          f"PostgreSQL {self.plan.old_major} again, {s} replays again (read-only for {window:.1f} s)."
                          + (f" {'; '.join(notes)}." if notes else "") + f"\n{exc}") from exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, interrupts.Interrupted):
        return f"stopped by {exc.signal}"
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by SIGINT"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


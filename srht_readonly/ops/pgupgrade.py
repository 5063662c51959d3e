"""``pg_upgrade`` on one node's host: the new cluster beside the old one, the checks, the run, the way back.

Layout (the plan's Alpine layout: configuration files inside the data directory). The new
cluster is made at ``DATA.upgrade-NEW`` (``initdb`` matching the old cluster's encoding, locale,
checksums and bootstrap superuser; the old configuration files copied in). After ``pg_upgrade``
the directories are swapped: ``DATA`` becomes ``DATA.pgOLD-TIMESTAMP`` and the new cluster takes
its place, so the inventory's ``data`` stays right and only its ``bin`` changes.

``pg_upgrade`` starts both servers itself, listening only on a Unix socket in a private
directory (mode 0700, the OS user's) with an ``hba_file`` that trusts local connections there:
nothing but this procedure can reach them, whatever the clusters' own pg_hba.conf says.

Methods (docs/upgrade.md): ``link`` (hard links; seconds whatever the size; the old cluster
must not be started once the new one has been, so the fallback is the paused standby), ``clone``
(reflinks, as fast where the file system supports them; the old cluster stays usable), ``copy``
(needs the data's size again in free space; the old cluster stays usable).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psycopg2.extensions

from . import sql
from .errors import CommandFailed, OpsError, Refused
from .postgres import PostgresServer
from .rewind import LOCAL_FILES
from .versions import Pg, parse_major

logger = logging.getLogger(__name__)

METHODS = ("link", "clone", "copy")
#: Column options stock PostgreSQL knows (ALTER TABLE ... ALTER COLUMN ... SET (...)).
STOCK_COLUMN_OPTIONS = frozenset({"n_distinct", "n_distinct_inherited"})
#: Kept free beyond the estimate in copy mode: WAL and logs of the new server's first minutes.
DISK_MARGIN = 64 * 2**20


def major_of_bin(server: PostgresServer, bin_dir: str | Path) -> int:
    """The major version of the PostgreSQL in ``bin_dir`` on ``server``'s host (``postgres --version``)."""
    proc = server.host.run([str(Path(bin_dir) / "postgres"), "--version"], user=server.os_user, check=False,
                           timeout=30)
    try:
        if proc.returncode == 0:
            return parse_major(proc.stdout)
    except ValueError:
        pass
    raise Refused(f"no PostgreSQL server in {bin_dir} on {server.host.name}: "
                  f"{(proc.stderr or proc.stdout).strip()[-200:] or 'postgres --version failed'}")


def major_of_data(server: PostgresServer) -> int:
    """The major version a data directory was made by (its ``PG_VERSION``)."""
    return int(server.host.read_text(server.data / "PG_VERSION").strip())


def upgrading_dir(server: PostgresServer, new_major: int) -> Path:
    return server.data.with_name(f"{server.data.name}.upgrade-{new_major}")


@dataclass(frozen=True)
class ClusterShape:
    """What the new cluster's initdb must match: encoding, locale, checksums, bootstrap superuser."""

    encoding: str
    collate: str
    ctype: str
    checksums: bool
    superuser: str

    def initdb_options(self, major: int) -> tuple[str, ...]:
        """initdb's options for ``major``: the old cluster's checksums, said the way that major's initdb wants."""
        return ("-E", self.encoding, "--lc-collate", self.collate, "--lc-ctype", self.ctype,
                *Pg(major).initdb_checksums(self.checksums), "-U", self.superuser)


def shape_of(dsn: str, server: PostgresServer) -> ClusterShape:
    """The running old cluster's shape (checksums from ``pg_controldata``, so it also works stopped later)."""
    enc, collate, ctype = sql.query_one(
        dsn, "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database WHERE datname = 'template1'")
    (superuser,) = sql.query_one(dsn, "SELECT rolname FROM pg_roles WHERE oid = 10")
    checksums = server.controldata().get("Data page checksum version", "0") != "0"
    return ClusterShape(str(enc), str(collate), str(ctype), checksums, str(superuser))


def init_new_cluster(old: PostgresServer, new_bin: Path, target: Path, shape: ClusterShape, *, major: int,
                     copy_config: bool = True) -> PostgresServer:
    """``initdb`` a new cluster at ``target`` with ``new_bin`` (PostgreSQL ``major``), shaped like the old one,
    the old one's config files copied in (``copy_config``)."""
    new = PostgresServer(target, bin=new_bin, host=old.host, os_user=old.os_user,
                         log=target.with_name(f"{target.name}.log"))
    # initdb --auth only matters for a scratch cluster: the old pg_hba.conf replaces it just below.
    old.host.run([str(new_bin / "initdb"), "-D", str(target), "--auth", "trust", "--no-sync",
                  *shape.initdb_options(major)], user=old.os_user, timeout=600)
    if copy_config:
        for name in LOCAL_FILES:
            if old.host.exists(old.data / name):
                new.write_file(name, old.host.read_text(old.data / name))
    return new


@dataclass
class ScratchServer:
    """A throwaway cluster listening only on a Unix socket in a private directory."""

    server: PostgresServer
    dsn: str

    def stop(self) -> None:
        self.server.stop("fast")


def rehearsal_copy(old: PostgresServer, dsn: str, target: Path, shape: ClusterShape, *, port: int) -> ScratchServer:
    """A schema-only copy of the running old cluster at ``target`` (old binaries), running; for a trial upgrade.

    ``pg_dumpall --schema-only`` of the old cluster restored with ``psql``: roles, databases, tables,
    indexes, functions, extensions; no rows. Errors for objects initdb already made (the bootstrap
    role) are expected and ignored; what pg_upgrade then fails on is what the real one would fail on.
    """
    major = major_of_data(old)
    scratch = PostgresServer(target, bin=old.bin, host=old.host, os_user=old.os_user,
                             log=target.with_name(f"{target.name}.log"))
    old.host.run([str(old.bin / "initdb"), "-D", str(target), "--auth", "trust", "--no-sync",
                  *shape.initdb_options(major)], user=old.os_user, timeout=600)
    sockets = target / "sockets"
    old.host.make_dir(sockets, owner=old.os_user, mode=0o700)
    scratch.set_settings({"listen_addresses": "", "port": port, "unix_socket_directories": str(sockets),
                          "fsync": False, "shared_buffers": "16MB", "max_connections": 20})
    scratch.start()
    source, env = _without_password(dsn)
    schema = old.host.run([str(old.bin / "pg_dumpall"), "--schema-only", "-d", source], user=old.os_user, env=env,
                          timeout=3600).stdout
    local = f"host={sockets} port={port} user={shape.superuser} dbname=postgres"
    old.host.run([str(old.bin / "psql"), "-X", "-q", "-d", local, "-f", "-"], user=old.os_user, input=schema,
                 timeout=3600)
    host, tport = old.host.tunnel(str(sockets), port)
    return ScratchServer(scratch, f"host={host} port={tport} user={shape.superuser} dbname=postgres")


def _without_password(dsn: str) -> tuple[str, dict[str, str]]:
    params = dict(psycopg2.extensions.parse_dsn(dsn))
    env = {"PGPASSWORD": params.pop("password")} if "password" in params else {}
    return psycopg2.extensions.make_dsn(**params), env


def unknown_settings(old: PostgresServer, new_bin: Path) -> list[str]:
    """Settings of the old cluster's config files that the new server does not know (it would refuse to start)."""
    known_proc = old.host.run([str(new_bin / "postgres"), "--describe-config"], user=old.os_user, timeout=60)
    known = {line.split("\t", 1)[0].lower() for line in known_proc.stdout.splitlines() if line.strip()}
    from .postgres import parse_conf

    found: list[str] = []
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        if old.host.exists(old.data / name):
            found += [key for key in parse_conf(old.host.read_text(old.data / name))
                      if "." not in key and key.lower() not in known and key not in found]
    return found


def databases(dsn: str) -> list[str]:
    return [r[0] for r in sql.query(dsn, "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]


def in_database(dsn: str, dbname: str) -> str:
    return psycopg2.extensions.make_dsn(dsn, dbname=dbname)


def missing_extensions(dsn: str, old: PostgresServer, new_bin: Path) -> dict[str, list[str]]:
    """Per database, the extensions installed there whose control file the new installation lacks."""
    share = old.host.run([str(new_bin / "pg_config"), "--sharedir"], user=old.os_user, timeout=30).stdout.strip()
    missing: dict[str, list[str]] = {}
    for db in databases(dsn):
        for (ext,) in sql.query(in_database(dsn, db), "SELECT extname FROM pg_extension ORDER BY 1"):
            if not old.host.exists(Path(share) / "extension" / f"{ext}.control"):
                missing.setdefault(db, []).append(ext)
    return missing


def foreign_column_options(dsn: str) -> dict[str, int]:
    """Column options (``attoptions``) on user columns that stock PostgreSQL does not know, with how many columns.

    A patched server may set its own (this machine's Debian 15 sets ``pg_attver`` on every
    column); the new server rejects them while restoring the schema, half-way through pg_upgrade,
    although ``pg_upgrade --check`` said the clusters were compatible.
    """
    found: dict[str, int] = {}
    for db in databases(dsn):
        rows = sql.query(in_database(dsn, db),
                         "SELECT split_part(o, '=', 1), count(*) FROM pg_attribute a, unnest(a.attoptions) o "
                         "WHERE a.attrelid >= 16384 AND a.attnum > 0 AND NOT a.attisdropped GROUP BY 1")
        for key, count in rows:
            if key not in STOCK_COLUMN_OPTIONS:
                found[key] = found.get(key, 0) + int(count)
    return found


def drop_column_options(dsn: str, keys: Iterable[str]) -> int:
    """Remove column options ``keys`` from every user column of every database (catalog update); rows changed.

    ``ALTER TABLE ... RESET`` cannot do it when the server sets them itself. Only options stock
    PostgreSQL does not know are ever passed here (``check``); the data files are untouched.
    """
    keys = sorted(set(keys))
    changed = 0
    for db in databases(dsn):
        with sql.connect(in_database(dsn, db)) as conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE pg_attribute SET attoptions = NULLIF(ARRAY(SELECT o FROM unnest(attoptions) o "
                "WHERE split_part(o, '=', 1) <> ALL(%s)), '{}') WHERE attrelid >= 16384 AND attoptions IS NOT NULL "
                "AND EXISTS (SELECT 1 FROM unnest(attoptions) o WHERE split_part(o, '=', 1) = ANY(%s))",
                (keys, keys))
            changed += cur.rowcount
    return changed


def disk_shortfall(old: PostgresServer, method: str) -> tuple[int, int] | None:
    """``(needed, free)`` bytes when ``method`` needs more free space beside the data than there is, else None.

    Copy mode needs the data's size again; link and clone need only the new catalogs (a margin).
    """
    used = int(old.host.run(["du", "-sk", str(old.data)], user=old.os_user, timeout=600).stdout.split()[0]) * 1024
    df = old.host.run(["df", "-Pk", str(old.data.parent)], timeout=30).stdout.splitlines()[-1].split()
    free = int(df[3]) * 1024
    needed = (used if method == "copy" else 0) + DISK_MARGIN
    return (needed, free) if free < needed else None


class PgUpgrade:
    """``pg_upgrade`` from ``old`` (its binaries) to ``new`` (a cluster made by ``init_new_cluster``), on their host."""

    def __init__(self, old: PostgresServer, new: PostgresServer, *, superuser: str) -> None:
        self.old, self.new, self.superuser = old, new, superuser
        self.host = old.host
        self.work = old.data.with_name(f"{old.data.name}.pg_upgrade")

    def _prepare_work(self) -> None:
        """The private socket directory and hba file the servers pg_upgrade starts use."""
        self.host.run(["rm", "-rf", str(self.work)], user=self.old.os_user, timeout=60)
        self.host.make_dir(self.work, owner=self.old.os_user, mode=0o700)
        self.host.write_text_atomic(self.work / "hba.conf", "local all all trust\n", owner=self.old.os_user,
                                    mode=0o600)

    def _argv(self, *extra: str, live_port: int | None = None) -> list[str]:
        hba = f"-c hba_file={self.work / 'hba.conf'}"
        argv = [str(self.new.bin / "pg_upgrade"), "-b", str(self.old.bin), "-B", str(self.new.bin),
                "-d", str(self.old.data), "-D", str(self.new.data), "-U", self.superuser, "-O", hba]
        if live_port is None:
            argv += ["-s", str(self.work), "-o", hba, "-p", "50432", "-P", "50433"]
        else:  # --check against the running old server: its own socket and port
            argv += ["-p", str(live_port), "-P", "50433"]
        return argv + list(extra)

    def check(self, *, live_port: int | None) -> str:
        """``pg_upgrade --check``; its report; ``Refused`` with the report when it finds a problem."""
        self._prepare_work()
        proc = self.host.run(self._argv("--check", live_port=live_port), user=self.old.os_user, check=False,
                             timeout=1800, cwd=self.work)
        if proc.returncode != 0:
            raise Refused("pg_upgrade --check found problems; nothing was changed:\n" + _report(proc, self.new))
        return proc.stdout

    def run(self, method: str) -> float:
        """The upgrade itself (both servers stopped); seconds. ``CommandFailed`` carries pg_upgrade's report."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
        self._prepare_work()
        started = time.monotonic()
        flag = {"link": ["--link"], "clone": ["--clone"], "copy": ["--copy"]}[method]
        proc = self.host.run(self._argv(*flag), user=self.old.os_user, check=False, timeout=6 * 3600, cwd=self.work)
        if proc.returncode != 0:
            raise CommandFailed(["pg_upgrade", *flag], proc.returncode, _report(proc, self.new), self.host.name)
        return time.monotonic() - started

    def cleanup(self) -> None:
        self.host.run(["rm", "-rf", str(self.work)], user=self.old.os_user, check=False, timeout=60)


def restore_old_control(old: PostgresServer) -> bool:
    """Undo link mode's last step on a failed run (pg_upgrade renames global/pg_control to pg_control.old once it
    starts linking); safe because the new cluster was never started. True if it was needed."""
    control, renamed = old.data / "global" / "pg_control", old.data / "global" / "pg_control.old"
    if old.host.exists(renamed) and not old.host.exists(control):
        old.host.rename(renamed, control)
        return True
    return False


def swap_in(old: PostgresServer, new: PostgresServer, old_major: int) -> Path:
    """Put the new cluster at the old one's path; the old one is kept beside it. Returns where it went."""
    kept = old.data.with_name(f"{old.data.name}.pg{old_major}-{time.strftime('%Y%m%d-%H%M%S')}")
    old.host.rename(old.data, kept)
    old.host.rename(new.data, old.data)
    return kept


def swap_back(old_path: Path, kept: Path, host_server: PostgresServer, failed: Path) -> None:
    """Undo ``swap_in``: the new cluster back to ``failed``, the old one back to ``old_path``."""
    host_server.host.rename(old_path, failed)
    host_server.host.rename(kept, old_path)


def analyze_in_stages(server: PostgresServer, conninfo: str, env: dict[str, str]) -> float:
    """``vacuumdb --all --analyze-in-stages`` (minimal statistics first, so plans are sane at once); seconds."""
    started = time.monotonic()
    server.host.run([str(server.bin / "vacuumdb"), "--all", "--analyze-in-stages", "--maintenance-db", conninfo],
                    user=server.os_user, env=env, timeout=6 * 3600)
    return time.monotonic() - started


def _report(proc: object, new: PostgresServer) -> str:
    """The useful part of a failed pg_upgrade: its own output's tail and the last lines of the log it points at."""
    out = ((getattr(proc, "stdout", "") or "") + (getattr(proc, "stderr", "") or "")).strip().splitlines()
    text = "\n".join(out[-15:])
    m = re.search(r'"([^"]+\.log)"', "\n".join(out))
    if m:
        try:
            log = new.host.read_text(m.group(1)).strip().splitlines()
        except (OSError, OpsError):
            log = []
        errors = [line for line in log if "error" in line.lower() or "fatal" in line.lower()]
        if errors:
            text += f"\n{m.group(1)} says:\n" + "\n".join(errors[-5:])
    return text


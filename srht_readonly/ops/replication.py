"""Streaming replication: the replication role and slot, base backup, standby settings, promotion.

These are the steps of the plan's "Preparing the hot standby" and "Standby promotion",
each a function that does one thing and checks that it happened.
"""

from __future__ import annotations

import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg2.extensions
from psycopg2 import sql as pgsql

from . import sql
from .errors import CommandFailed, OpsError
from .postgres import PostgresServer

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called with (done, total) in kB while a base backup runs."""


def ensure_replication_role(dsn: str, user: str, password: str | None = None) -> bool:
    """Create (or fix) a LOGIN REPLICATION role; True if anything changed.

    The password never leaves this process: the server is sent its SCRAM-SHA-256 verifier,
    computed here by libpq, so a statement log (``log_statement = ddl``) shows no password;
    nor does argv.
    """
    rows = sql.query(dsn, "SELECT rolcanlogin, rolreplication FROM pg_roles WHERE rolname = %s", (user,))
    with sql.connect(dsn) as conn, conn.cursor() as cur:
        verb = "ALTER" if rows else "CREATE"
        stmt = pgsql.SQL("{} ROLE {} WITH LOGIN REPLICATION").format(pgsql.SQL(verb), pgsql.Identifier(user))
        if password is not None:
            verifier = psycopg2.extensions.encrypt_password(password, user, conn, "scram-sha-256")
            stmt = stmt + pgsql.SQL(" PASSWORD {}").format(pgsql.Literal(verifier))
        if rows and rows[0] == (True, True) and password is None:
            return False
        cur.execute(stmt)
    return True


def ensure_slot(dsn: str, name: str, *, reserve: bool = False) -> bool:
    """Create the physical replication slot ``name`` if missing; True if it was created.

    ``reserve`` makes the slot hold WAL from now on, before its standby first connects.
    """
    if sql.query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)):
        return False
    sql.execute(dsn, "SELECT pg_create_physical_replication_slot(%s, %s)", (name, reserve))
    return True


def drop_slot(dsn: str, name: str) -> bool:
    """Drop the slot ``name`` if it exists (it must be inactive); True if it was dropped."""
    if not sql.query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (name,)):
        return False
    sql.execute(dsn, "SELECT pg_drop_replication_slot(%s)", (name,))
    return True


_PROGRESS = re.compile(r"(\d+)/(\d+) kB")


def base_backup(
    target: PostgresServer,
    source_conninfo: str,
    *,
    slot: str | None = None,
    progress: Progress | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    sync: bool = True,
) -> None:
    """Copy the primary into ``target.data`` with ``pg_basebackup`` (plain format, WAL streamed).

    Always ``--checkpoint=fast``: the default spread checkpoint made an idle lab wait 92 s.
    The target directory must be empty or absent. ``progress(done_kb, total_kb)`` is called as
    pg_basebackup reports; ``env`` may carry ``PGPASSFILE`` so no password is ever in argv, and
    ``-w`` makes a missing one an error instead of a prompt nobody answers. Past ``timeout`` it
    is killed, whether or not it still prints. ``sync=False`` (the lab's throwaway copies
    only) skips the final fsync.
    """
    if target.host.exists(target.data) and target.host.listdir(target.data):
        raise OpsError(f"{target.data} is not empty; move it away before taking a base backup into it")
    target.host.make_dir(target.data, owner=target.os_user, mode=0o700)
    argv = [target.tool("pg_basebackup"), "-D", str(target.data), "-d", source_conninfo,
            "--checkpoint=fast", "-X", "stream", "-P", "-w", *([] if sync else ["--no-sync"])]
    if slot:
        argv += ["-S", slot]
    err: list[str] = []
    with target.host.popen(argv, user=target.os_user, env=env,
                           stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) as proc:
        assert proc.stderr is not None
        # A stalled copy prints nothing: only a timer can tell it is time to give up.
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        buf = ""
        while chunk := proc.stderr.read(256):
            buf += chunk
            # pg_basebackup redraws its progress line with \r.
            *lines, buf = re.split(r"[\r\n]", buf)
            for line in lines:
                m = _PROGRESS.search(line)
                if m and progress is not None:
                    progress(int(m.group(1)), int(m.group(2)))
                elif line.strip() and not m:
                    err.append(line)
        code = proc.wait()
        watchdog.cancel()
        if killed.is_set():
            err.append(f"no progress: killed after {timeout:g} s")
    if code != 0:
        raise CommandFailed(argv, code, "\n".join(err), target.host.name)


def configure_standby(server: PostgresServer, primary_conninfo: str, *, slot: str | None,
                      extra: dict[str, object] | None = None) -> None:
    """Make ``server`` a hot standby of ``primary_conninfo``: ``standby.signal`` plus settings.

    Sets ``primary_conninfo``, ``primary_slot_name`` and ``hot_standby = on`` in
    postgresql.auto.conf (effective at the next start).
    """
    settings: dict[str, object] = {
        "primary_conninfo": primary_conninfo,
        "primary_slot_name": slot,
        "hot_standby": True,
        "recovery_target_timeline": "latest",
    }
    settings.update(extra or {})
    server.set_settings(settings)
    server.write_file("standby.signal", "")


def wait_streaming(standby_dsn: str, *, timeout: float = 30) -> str:
    """Wait until the standby's WAL receiver streams; returns the primary it streams from."""

    def streaming() -> str | None:
        rows = sql.query(standby_dsn, "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver")
        if rows and rows[0][0] == "streaming":
            return f"{rows[0][1]}:{rows[0][2]}"
        return None

    return sql.wait_until(streaming, timeout=timeout, what="the standby to stream")  # type: ignore[no-any-return]


def wait_replayed(standby_dsn: str, lsn: str, *, timeout: float = 30) -> None:
    """Wait until the standby has replayed up to ``lsn``."""

    def replayed() -> bool:
        (done,) = sql.query_one(
            standby_dsn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
        )
        return bool(done)

    sql.wait_until(replayed, timeout=timeout, what=f"the standby to replay {lsn}")


def wait_caught_up(primary_dsn: str, standby_dsn: str, *, timeout: float = 30) -> str:
    """Wait until the standby has replayed everything the primary had written when called."""
    (lsn,) = sql.query_one(primary_dsn, "SELECT pg_current_wal_lsn()::text")
    wait_replayed(standby_dsn, lsn, timeout=timeout)
    return str(lsn)


@dataclass(frozen=True)
class Promotion:
    """What a promotion changed: the timeline before and after, and how long it took."""

    timeline_before: int
    timeline_after: int
    seconds: float


def promote(dsn: str, *, wait_seconds: int = 60) -> Promotion:
    """``pg_promote(true, wait_seconds)`` and verify: out of recovery, timeline went up."""
    if sql.role(dsn) != "standby":
        raise OpsError("refusing to promote: the server is not in recovery (already a primary?)")
    before = sql.timeline(dsn)
    start = time.monotonic()
    (ok,) = sql.query_one(dsn, "SELECT pg_promote(true, %s)", (wait_seconds,))
    if not ok:
        raise OpsError(f"pg_promote did not finish within {wait_seconds} s; look at the server log")
    if sql.role(dsn) != "primary":
        raise OpsError("pg_promote returned but the server is still in recovery")
    after = sql.timeline(dsn)
    if after <= before:
        raise OpsError(f"promotion left the timeline at {after} (was {before})")
    took = time.monotonic() - start
    logger.info("promoted: timeline %d -> %d in %.2f s", before, after, took)
    return Promotion(before, after, took)


def checkpoint(dsn: str) -> None:
    """Force a checkpoint (after promotion, so pg_rewind and base backups see the new timeline)."""
    sql.execute(dsn, "CHECKPOINT")

"""The backup engine, Barman, driven through its own CLI (``barman -c CONFIG -f json ...``) on its host.

Why Barman (docs/past.md): its streaming archiver is ``pg_receivewal`` through a replication slot, so
the plan's "streaming replication instead of log shipping, ``archive_mode = off``" still holds; its
``backup_method = postgres`` takes base backups with ``pg_basebackup``; ``barman recover
--target-time`` restores a base backup and the WAL to replay into any directory.

``window()`` answers the plan's question "how far into the past can we peek?": from the end of
the oldest base backup to now while WAL streams (the segment being written is used too), else to
the close of the last archived segment.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from . import sql
from .errors import OpsError, Refused
from .inventory import BackupSpec
from .remote import Host

__all__ = ["Backup", "Barman", "BackupWindow", "parse_time"]

logger = logging.getLogger(__name__)


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 time (``2026-11-30T19:51:40Z``, ``2026-11-30 19:51:40.1+00:00``); without an offset it is
    this machine's local time, made explicit (Barman would read a naive time in its own time zone)."""
    value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return value if value.tzinfo is not None else value.astimezone()


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat()


@dataclass
class Backup:
    id: str
    begin: str | None
    end: str | None
    end_timestamp: float | None
    status: str
    size_bytes: int | None


@dataclass
class BackupWindow:
    """What can be recovered, as Barman says it: ``earliest`` to ``latest`` (ISO 8601, UTC)."""

    engine: str
    server: str
    earliest: str | None
    latest: str | None
    streaming: bool
    last_archived_wal: str | None
    last_archived_at: str | None
    backups: list[Backup] = field(default_factory=list)
    wal_files: int = 0
    retention: str | None = None
    last_success: str | None = None
    problems: list[str] = field(default_factory=list)

    def contains(self, at: dt.datetime) -> bool:
        if self.earliest is None or self.latest is None:
            return False
        return dt.datetime.fromisoformat(self.earliest) <= at <= dt.datetime.fromisoformat(self.latest)

    def text(self) -> str:
        if self.earliest is None:
            return f"{self.engine} server {self.server}: no base backup yet: nothing can be recovered"
        latest = f"now ({self.latest}; WAL streams)" if self.streaming else f"{self.latest} (WAL does NOT stream)"
        lines = [f"recoverable: {self.earliest} to {latest}",
                 f"base backups: {len(self.backups)} (last success {self.last_success or 'never'}); "
                 f"WAL files kept: {self.wal_files}; retention: {self.retention or '?'}"]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


class Barman:
    """``[backup]``'s Barman, run on its host (``barman -c CONFIG``)."""

    def __init__(self, spec: BackupSpec, host: Host) -> None:
        self.spec, self.host = spec, host

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = self.host.run([self.spec.barman, "-c", self.spec.config, *args], check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise OpsError(f"barman {' '.join(args)} on {self.host.name} exited {proc.returncode}: "
                           f"{_errors(proc.stdout) or (proc.stderr or proc.stdout).strip()[-600:]}")
        return proc

    def json(self, *args: str, timeout: float = 600, failing: bool = False) -> Any:
        """``barman -f json ARGS``; ``failing``: a non-zero exit still returns the JSON (``check`` exits 1 when
        any check failed)."""
        proc = self.run("-f", "json", *args, timeout=timeout, check=False)
        try:
            doc = json.loads(proc.stdout)
        except json.JSONDecodeError:
            doc = None
        if doc is None or (proc.returncode != 0 and not (failing and not _errors(proc.stdout))):
            raise OpsError(f"barman {' '.join(args)} on {self.host.name} exited {proc.returncode}: "
                           f"{_errors(proc.stdout) or (proc.stderr or proc.stdout).strip()[-600:]}")
        return doc

    def backups(self) -> list[Backup]:
        """Every base backup, oldest first, from one ``list-backups``. Its end times are whole seconds, rounded
        down: one second is added, so a time called recoverable always is (Barman refuses a target before
        the backup's end)."""
        rows = self.json("list-backups", self.spec.server).get(self.spec.server, [])
        out = []
        for row in rows:
            end = float(row["end_time_timestamp"]) + 1.0 if row.get("end_time_timestamp") else None
            out.append(Backup(row["backup_id"], None, _iso(end), end, row.get("status", "?"), row.get("size_bytes")))
        return sorted(out, key=lambda b: b.end_timestamp or 0)

    def window(self) -> BackupWindow:
        server = self.spec.server
        status = self.json("status", server).get(server, {})
        checks = self.json("check", server, timeout=120, failing=True).get(server, {})
        backups = self.backups()
        done = [b for b in backups if b.status == "DONE"]
        diag = json.loads(self.run("diagnose", timeout=120).stdout)["servers"].get(server, {})
        per_tli = (diag.get("wals") or {}).get("last_archived_wal_per_timeline") or {}
        last = max(per_tli.values(), key=lambda w: w.get("time", 0), default=None)
        streaming = checks.get("receive_wal_running", {}).get("status") == "OK" and \
            checks.get("postgresql_streaming", {}).get("status") == "OK"
        wal_files = 0
        if done:
            oldest = self.json("show-backup", server, done[0].id)[server]
            wal_files = int(oldest.get("base_backup_information", {}).get("wal_num") or 0) + \
                int(oldest.get("wal_information", {}).get("no_of_files") or 0)
        last_at = _iso(last.get("time")) if last else None
        latest = _iso(time.time()) if streaming else last_at
        problems = [f"{name}: {c.get('hint') or 'FAILED'}" for name, c in checks.items()
                    if isinstance(c, dict) and c.get("status") not in ("OK", None)]
        return BackupWindow(
            "barman", server, done[0].end if done else None, latest if done else None, streaming,
            last.get("name") if last else None, last_at, backups, wal_files,
            (status.get("retention_policies") or {}).get("message"), done[-1].end if done else None, problems)

    def cron(self) -> None:
        """``barman cron``, as the minute's cron job does: (re)starts WAL streaming, from the node its conninfo
        reaches now (after a failover: the new primary, where ``create_slot = auto`` makes the slot)."""
        self.run("cron", timeout=120)

    def switch_wal(self, primary_dsn: str, *, timeout: float = 60) -> float:
        """Close the primary's current WAL segment and wait until Barman archived it; seconds.

        Streamed WAL reaches Barman's archive only once the next segment has begun, so an empty
        transaction (``SELECT txid_current()``) is committed on the primary every 0.2 s while waiting:
        an idle primary would take ~15 s.
        """
        return self._nudged(["switch-wal", "--force", "--archive", "--archive-timeout", str(int(timeout)),
                             self.spec.server], primary_dsn, timeout=timeout + 30)

    def _nudged(self, args: list[str], primary_dsn: str | None, *, timeout: float) -> float:
        """``barman ARGS``, committing an empty transaction on the primary every 0.2 s until it ends; seconds."""
        started = time.monotonic()
        proc = self.host.popen([self.spec.barman, "-c", self.spec.config, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - started > timeout:
                    proc.kill()
                    break
                if primary_dsn is not None:
                    with contextlib.suppress(OpsError):
                        sql.execute(primary_dsn, "SELECT txid_current()")
                time.sleep(0.2)
        finally:
            out = proc.communicate(timeout=30)[0] or ""
        if proc.returncode != 0:
            raise OpsError(f"barman {args[0]} on {self.host.name} failed: {_errors(out) or out.strip()[-600:]}")
        return time.monotonic() - started

    def backup_now(self, primary_dsn: str | None = None, *, timeout: float = 6 * 3600) -> Backup:
        """A base backup now (``barman backup --wait``: done once the WAL it needs is archived). With the
        primary's ``primary_dsn``, empty transactions there let that WAL reach the archive at once."""
        self._nudged(["backup", "--wait", self.spec.server], primary_dsn, timeout=timeout)
        return self.backups()[-1]

    def base_for(self, at: dt.datetime) -> Backup:
        """The newest finished base backup that ended before ``at``."""
        usable = [b for b in self.backups() if b.status == "DONE" and b.end_timestamp is not None
                  and b.end_timestamp < at.timestamp()]
        if not usable:
            raise Refused(f"no base backup ended before {at.isoformat()}")
        return usable[-1]

    def recover(self, backup: Backup, destination: str, at: dt.datetime | None) -> float:
        """Restore ``backup`` into ``destination`` (created by Barman), to replay to ``at`` and pause there, on
        the timeline the fleet is on now (``--target-tli latest``). Seconds taken. Call ``switch_wal`` first so
        the WAL up to ``at`` is archived."""
        started = time.monotonic()
        # --target-tli latest: follow the promotions since the base backup (their .history files and WAL)
        target = ["--target-time", at.isoformat(), "--target-action", "pause", "--target-tli", "latest"] \
            if at else ["--target-immediate"]
        self.run("recover", *target, self.spec.server, backup.id, destination, timeout=6 * 3600)
        return time.monotonic() - started


def _errors(stdout: str) -> str:
    try:
        doc = json.loads(stdout)
    except (json.JSONDecodeError, TypeError):
        return ""
    if isinstance(doc, dict) and doc.get("_ERROR"):
        return "; ".join(map(str, doc["_ERROR"]))
    return ""

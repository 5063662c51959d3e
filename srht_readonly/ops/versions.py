"""What differs between the PostgreSQL majors ops supports (12 to 18), decided in one place.

``Pg(major)`` answers every question whose answer depends on the server's major version, each
a property or method named after what it decides, with the major that changed it. Build it
from a running server's ``server_version_num`` (``Pg.of(150004)``), or from the binaries'
``postgres --version`` (``Pg(parse_major(text))``, see ``PostgresServer.major``) for what must
be decided before a server runs: the settings written before its first start, initdb's options.

Everything else ops sends works unchanged from 12 to 18 (``pg_promote``, ``pg_stat_replication``'s
``sent_lsn``/``replay_lsn``/``replay_lag``, ``pg_stat_wal_receiver``'s ``status``/``sender_host``/
``sender_port``/``received_tli``, ``pg_replication_slots.restart_lsn``, ``pg_hba_file_rules``,
``pg_control_checkpoint()``, ``standby.signal``); docs/cli.md lists the audit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NEWEST", "OLDEST", "Pg", "parse_major"]

#: The majors whose SQL and settings ops knows (docs/cli.md, "Supported PostgreSQL versions").
OLDEST, NEWEST = 12, 18
#: WAL segment size of a default initdb: wal_keep_segments counts segments of it (PostgreSQL 12).
WAL_SEGMENT_MB = 16


def parse_major(text: str) -> int:
    """The major version in ``postgres --version``'s output, a ``version()`` string or ``PG_VERSION``.

    ``postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)`` -> 15; ``PostgreSQL 18.6 on x86_64...`` -> 18;
    ``18beta1`` -> 18; ``12`` -> 12. ``ValueError`` when there is none.
    """
    m = re.search(r"PostgreSQL\)?\s+(\d+)", text) or re.fullmatch(r"\s*(\d+)(?:\.\d+)?\s*", text)
    if not m:
        raise ValueError(f"no PostgreSQL version in {text.strip()[:200]!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class Pg:
    """A PostgreSQL major version and what ops must do differently on it."""

    major: int

    @classmethod
    def of(cls, version_num: int | str) -> Pg:
        """From ``server_version_num`` (``150004`` -> 15; 10 and later count majors in units of 10000)."""
        return cls(int(version_num) // 10000)

    def since(self, major: int) -> bool:
        return self.major >= major

    # --- settings --------------------------------------------------------------------------

    def wal_keep(self, megabytes: int) -> dict[str, object]:
        """Keep ``megabytes`` of WAL for standbys: ``wal_keep_size`` from 13, ``wal_keep_segments`` before
        (13 removed it: a server given the wrong one refuses to start)."""
        if self.since(13):
            return {"wal_keep_size": f"{megabytes}MB"}
        return {"wal_keep_segments": max(1, -(-megabytes // WAL_SEGMENT_MB))}

    def initdb_checksums(self, enabled: bool | None) -> tuple[str, ...]:
        """initdb's options for data checksums: ``None`` keeps the major's default (off before 18, on from 18);
        off on 18+ needs ``--no-data-checksums``, which initdb before 18 does not know."""
        if enabled is None:
            return ()
        if enabled:
            return ("--data-checksums",)
        return ("--no-data-checksums",) if self.since(18) else ()

    # --- catalogs ----------------------------------------------------------------------------

    @property
    def slot_wal_status(self) -> str:
        """``pg_replication_slots.wal_status`` (13+), or a NULL of its type before."""
        return "wal_status" if self.since(13) else "NULL::text"

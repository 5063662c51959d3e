"""Bring a former primary's data directory back in line with the new primary: crash recovery, ``pg_rewind``.

Used by ``demote`` (the operator's procedure) and by ``Lab.rejoin`` (the lab and the drill), so
the lab exercises the code operators run.

``pg_rewind`` needs a cleanly shut down target: a node that crashed first replays its WAL in
single-user mode (``finish_crash_recovery``). It copies the source's configuration files over the
target's, so ``rewind`` keeps the node's own (``LOCAL_FILES``) and puts them back afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from . import sql
from .postgres import PostgresServer

__all__ = ["CLEAN", "LOCAL_FILES", "finish_crash_recovery", "is_clean", "rewind"]

#: ``pg_controldata``'s "Database cluster state" of a cleanly shut down server.
CLEAN = ("shut down", "shut down in recovery")
#: A node's own configuration, which ``pg_rewind`` would replace with the source's.
LOCAL_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")


def is_clean(control: Mapping[str, str]) -> bool:
    """Whether ``pg_controldata``'s output says the server was shut down cleanly."""
    return control.get("Database cluster state") in CLEAN


def finish_crash_recovery(server: PostgresServer, *, timeout: float = 600) -> None:
    """Replay a crashed node's WAL in single-user mode, so it ends with a clean shutdown (pg_rewind needs one)."""
    for name in ("standby.signal", "recovery.signal"):
        server.host.remove(server.data / name)
    server.host.run([server.tool("postgres"), "--single", "-D", str(server.data), "-c", "hot_standby=off",
                     "postgres"], user=server.os_user, input="", timeout=timeout)


def rewind(server: PostgresServer, source: str, *, checkpoint_dsn: str, env: Mapping[str, str] | None = None,
           sync: bool = True, timeout: float = 3600) -> None:
    """``pg_rewind`` ``server`` (stopped cleanly) from ``source``, keeping the node's own config files.

    ``checkpoint_dsn`` reaches the source as ops does: a CHECKPOINT there first, so its control
    file shows the new timeline (a freshly promoted primary may not have written one yet).
    ``env`` carries the source's password, never the command line. ``sync=False`` skips the
    final fsync (the lab's throwaway directories only).
    """
    sql.execute(checkpoint_dsn, "CHECKPOINT")
    kept = {}
    for name in LOCAL_FILES:
        path = server.data / name
        if server.host.exists(path):
            kept[name] = server.host.read_text(path)
    server.host.run([server.tool("pg_rewind"), "-D", str(server.data), "--source-server", source,
                     *([] if sync else ["--no-sync"])], user=server.os_user, env=dict(env or {}), timeout=timeout)
    for name, text in kept.items():
        server.write_file(name, text)

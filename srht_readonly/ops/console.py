"""PgBouncer's admin console: many driven in parallel, each command with a deadline; or one, ``Admin``.

psycopg2's asynchronous mode lets one thread send ``RELOAD`` to every PgBouncer at the same
moment and wait for all of them with ``select``. It also gives ``PAUSE`` a real timeout: a PAUSE
that has not returned in time has its connection *closed* before anyone sends RESUME, because a
RESUME issued while a PAUSE is still pending leaves that PAUSE hung forever (PgBouncer issue 715).
``Admin`` is the same client for one console and one command at a time (the lab, the tests,
``status``): it connects, runs the command within its deadline, and closes.
"""

from __future__ import annotations

import logging
import re
import select
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from .errors import OpsError
from .sql import redact

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How one command went on one console."""

    ok: bool
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


class Console:
    """One admin-console connection in asynchronous mode; ``key`` names it in results."""

    def __init__(self, key: str, dsn: str) -> None:
        self.key = key
        self.dsn = dsn
        self.conn: ext.connection | None = None
        self.cursor: Any = None

    def __repr__(self) -> str:
        return f"<Console {self.key} {redact(self.dsn)}>"

    @property
    def is_open(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()
        self.conn = None


def connect(consoles: Iterable[Console], *, timeout: float = 5) -> dict[str, Outcome]:
    """Open every console at once; a console that fails or times out is left closed."""
    started = {}
    results: dict[str, Outcome] = {}
    for c in consoles:
        try:
            c.conn = psycopg2.connect(c.dsn, async_=1)
            started[c.key] = c
        except psycopg2.Error as exc:
            results[c.key] = Outcome(False, error=f"cannot connect to {redact(c.dsn)}: {str(exc).strip()}")
    results.update(_drive(started, timeout, "connect"))
    for key, outcome in results.items():
        if not outcome.ok and key in started:
            started[key].close()
    return results


def execute(consoles: Iterable[Console], command: str | Mapping[str, str], *, timeout: float = 5) -> dict[str, Outcome]:
    """Send ``command`` (one for all, or one per key) to every open console; wait for all, up to ``timeout``.

    A console whose command fails or times out is closed, so nothing stays waiting on it.
    """
    started = {}
    results: dict[str, Outcome] = {}
    for c in consoles:
        text = command if isinstance(command, str) else command[c.key]
        if not c.is_open:
            results[c.key] = Outcome(False, error="console not connected")
            continue
        try:
            assert c.conn is not None
            c.cursor = c.conn.cursor()
            c.cursor.execute(text)
            started[c.key] = c
        except psycopg2.Error as exc:
            c.close()
            results[c.key] = Outcome(False, error=_message(exc))
    results.update(_drive(started, timeout, command if isinstance(command, str) else "command"))
    for key, outcome in results.items():
        done = started.get(key)
        if done is None:
            continue
        if outcome.ok and done.cursor is not None and done.cursor.description is not None:
            cols = [d.name for d in done.cursor.description]
            outcome.rows = [dict(zip(cols, row, strict=True)) for row in done.cursor.fetchall()]
        if not outcome.ok:
            done.close()
    return results


def _drive(pending: dict[str, Console], timeout: float, what: str) -> dict[str, Outcome]:
    """Poll every pending connection until it is done, failed, or the deadline passes."""
    start = time.monotonic()
    deadline = start + timeout
    results: dict[str, Outcome] = {}
    pending = dict(pending)
    while pending:
        readers, writers = [], []
        for key, c in list(pending.items()):
            assert c.conn is not None
            try:
                state = c.conn.poll()
            except psycopg2.Error as exc:
                results[key] = Outcome(False, error=_message(exc), seconds=time.monotonic() - start)
                del pending[key]
                continue
            if state == ext.POLL_OK:
                results[key] = Outcome(True, seconds=time.monotonic() - start)
                del pending[key]
            elif state == ext.POLL_READ:
                readers.append(c.conn.fileno())
            else:
                writers.append(c.conn.fileno())
        if not pending:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            for key in pending:
                results[key] = Outcome(False, error=f"{what.split()[0]} did not finish within {timeout:g} s",
                                       seconds=timeout)
            break
        select.select(readers, writers, [], min(left, 0.05))
    return results


def _message(exc: psycopg2.Error) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Admin:
    """One PgBouncer's admin console (``dbname=pgbouncer``, a user in ``admin_users``), one command at a time.

    ``timeout`` bounds connecting; ``command_timeout`` each command (a ``PAUSE`` waits for the
    running transactions to end). A failure raises ``OpsError`` naming the console.
    """

    def __init__(self, dsn: str, *, timeout: float = 3, command_timeout: float = 60) -> None:
        self.dsn = dsn
        self.timeout = timeout
        self.command_timeout = command_timeout

    def _command(self, command: str) -> list[dict[str, Any]]:
        console = Console("admin", self.dsn)
        try:
            reached = connect([console], timeout=self.timeout)["admin"]
            if not reached.ok:
                raise OpsError(f"cannot reach PgBouncer's console at {redact(self.dsn)}: {reached.error}")
            done = execute([console], command, timeout=self.command_timeout)["admin"]
            if not done.ok:
                raise OpsError(f"PgBouncer {command.split()[0]} failed: {done.error}")
            return done.rows
        finally:
            console.close()

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` (DATABASES, POOLS, CONFIG, ...) as a list of dicts."""
        return self._command(f"SHOW {what}")

    def databases(self) -> dict[str, dict[str, Any]]:
        """``SHOW DATABASES`` keyed by database name (host, port, paused, disabled...)."""
        return {row["name"]: row for row in self.show("DATABASES")}

    def config(self) -> dict[str, str]:
        """``SHOW CONFIG`` as {key: value}."""
        return {row["key"]: row["value"] for row in self.show("CONFIG")}

    def reload(self) -> None:
        self._command("RELOAD")

    def pause(self, db: str | None = None) -> None:
        """``PAUSE``: returns once every server connection is released (no transaction running)."""
        self._command(f"PAUSE {_ident(db)}" if db else "PAUSE")

    def resume(self, db: str | None = None) -> None:
        self._command(f"RESUME {_ident(db)}" if db else "RESUME")

    def set(self, key: str, value: str | int) -> None:
        """``SET key = value`` (runtime only; the file still rules at the next RELOAD)."""
        self._command(f"SET {key} = '{value}'")


def _ident(name: str) -> str:
    if not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"unsafe database name for the admin console: {name!r}")
    return name

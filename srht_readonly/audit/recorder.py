"""The two recorders: the server's statement log (no code change) and a SQLAlchemy event hook (the Python frame).

**Server side.** ``ServerLog(node)`` turns on ``log_statement = all`` on one of the lab's
PostgreSQL servers with a ``log_line_prefix`` that carries the session id (``%c``), the virtual
transaction id (``%v``), the pid, user and database, waits until the server logs that way, and
remembers where its log stood; ``statements()`` parses what was logged since (``parse_log``:
multi-line statements, the extended protocol's ``execute <name>:`` lines); ``stop()`` puts the
settings back. What is audited is the application's traffic through PgBouncer: the statements of
sessions that are not PgBouncer's server connections (told from PgBouncer's own log, see
``through_bouncer``) and those of the lab's administrative roles (``ADMIN_USERS``: the lab, ops
and pytest-postgresql use them) are left out.

**Python side.** ``SqlAlchemyRecorder`` listens to ``before_cursor_execute`` (and ``begin``,
``commit``, ``rollback`` to know the transaction) on an engine, or on every engine when
installed on the ``Engine`` class, and records each statement with the first stack frame outside
SQLAlchemy, the drivers and srht_readonly. It keeps them in memory or hands them to a ``sink``
(``JsonLines``: a file several processes append to; see ``_site/sitecustomize.py``).
"""

from __future__ import annotations

import calendar
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analyse import Statement

if TYPE_CHECKING:
    from ..testing.servers import LabBouncer, LabNode

__all__ = ["ADMIN_USERS", "LOG_PREFIX", "JsonLines", "ServerLog", "SqlAlchemyRecorder", "bouncer_connections",
           "caller", "parse_log", "read_json_lines", "through_bouncer"]

logger = logging.getLogger(__name__)

#: ``%q``: background processes stop there; sessions add ``(session vxid user database client)``.
LOG_PREFIX = "%m [%p] %q(%c %v %u %d %r) "
LOG_SETTINGS: dict[str, object] = {"log_statement": "all", "log_line_prefix": LOG_PREFIX}
#: Roles whose statements are not the application's: the lab's superuser and its replication role.
ADMIN_USERS = frozenset({"postgres", "replicator"})

_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(?P<pid>\d+)\] "
    r"(?:\((?P<session>[0-9a-f]+\.[0-9a-f]+) (?P<vxid>\S*) (?P<user>\S*) (?P<db>\S*) (?P<client>\S*)\) )?"
    r"(?P<level>[A-Z][A-Z0-9]*):  (?P<message>.*)$"
)
#: PgBouncer's line for each server connection it opens (``log_connections``, on by default).
_BOUNCER_CONNECT = re.compile(r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)? (?P<tz>\S+) .* new connection to "
                              r"server \(from (?P<addr>[^)]*)\)")
#: Seconds between PgBouncer's log line and the session's start for the two to be the same connection.
TOLERANCE = 5.0
_EXECUTE = re.compile(r"^execute (?P<name><unnamed>|[^/:]+?)(?:/(?P<portal>[^:]*))?: (?P<text>.*)$", re.DOTALL)


Keep = Callable[[str, str], bool]


def parse_log(text: str, *, node: str = "", exclude_users: Iterable[str] = ADMIN_USERS,
              keep: Keep | None = None) -> list[Statement]:
    """The statements in ``text`` (a server log written with ``LOG_PREFIX``), in order.

    A record is a prefixed line and the tab-indented lines that continue it (PostgreSQL indents
    every further line of a multi-line message). ``statement: ...`` records are simple-protocol
    queries; ``execute NAME: ...`` ones extended-protocol executions, ``NAME`` ``<unnamed>`` or a
    prepared statement's name (``execute fetch from`` continues a portal already counted).
    Records without a session (background processes, lines of another prefix) are skipped, and
    so are those of sessions for which ``keep(session id, client)`` is false (``%c``, ``%r``).
    """
    excluded = set(exclude_users)
    found: list[Statement] = []
    for fields, message in _records(text):
        if fields is None or fields["session"] is None or fields["level"] != "LOG":
            continue
        if fields["user"] in excluded:
            continue
        if keep is not None and not keep(fields["session"] or "", fields["client"] or ""):
            continue
        session = f"{node}:{fields['session']}" if node else fields["session"]
        transaction = fields["vxid"] or None
        if message.startswith("execute fetch from "):
            continue  # more rows of a portal whose execution was recorded
        if message.startswith("statement: "):
            found.append(Statement(session, transaction, message[len("statement: "):]))
        elif (m := _EXECUTE.match(message)) is not None:
            name = m.group("name")
            found.append(Statement(session, transaction, m.group("text"),
                                   prepared=None if name == "<unnamed>" else name))
    return found


def _records(text: str) -> Iterator[tuple[dict[str, str | None] | None, str]]:
    """``(prefix fields, message)`` of each record; a foreign line yields ``(None, line)``."""
    fields: dict[str, str | None] | None = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t") and fields is not None:
            lines.append(line[1:])
            continue
        if fields is not None:
            yield fields, "\n".join(lines)
            fields, lines = None, []
        m = _RECORD.match(line)
        if m is None:
            yield None, line
            continue
        fields = m.groupdict()
        lines = [fields.pop("message") or ""]
    if fields is not None:
        yield fields, "\n".join(lines)


def bouncer_connections(text: str) -> dict[str, list[float]]:
    """From a PgBouncer log: the local port of each server connection it opened, with when (epoch seconds)."""
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = _BOUNCER_CONNECT.match(line)
        if m is None:
            continue
        try:
            when = _epoch(m.group("ts"), m.group("tz"))
        except ValueError:
            continue
        port = m.group("addr").rpartition(":")[2]
        found.setdefault(port, []).append(when)
    return found


def through_bouncer(connections: dict[str, list[float]]) -> Keep:
    """``keep`` for ``parse_log``: the session is one of PgBouncer's server connections.

    Matched on the client port of the session (``%r``: ``127.0.0.1(PORT)``) and its start time
    (the first part of ``%c``), within ``TOLERANCE`` seconds of PgBouncer's log line.
    """

    def keep(session: str, client: str) -> bool:
        m = re.fullmatch(r".*\((\d+)\)", client)
        if m is None:  # [local]: a Unix socket, not PgBouncer's
            return False
        try:
            started = int(session.split(".", 1)[0], 16)
        except ValueError:
            return False
        return any(abs(started - when) <= TOLERANCE for when in connections.get(m.group(1), ()))

    return keep


def _epoch(stamp: str, zone: str) -> float:
    parsed = time.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    if zone in ("UTC", "GMT", "Z", "+00", "+0000"):
        return float(calendar.timegm(parsed))
    return time.mktime(parsed)  # PgBouncer runs on this machine: its local time is ours


class ServerLog:
    """Statement logging on one lab node, from ``start()`` to ``stop()``; ``statements()`` since ``start()``.

    With ``bouncers`` (the lab's PgBouncers), only the sessions that are their server
    connections are kept: a client connected straight to PostgreSQL keeps its session, and
    session state is fine there (the place to LISTEN, for one).
    """

    def __init__(self, node: LabNode, *, bouncers: Iterable[LabBouncer] = (),
                 exclude_users: Iterable[str] = ADMIN_USERS, timeout: float = 10) -> None:
        self.node = node
        self.bouncers = list(bouncers)
        self.exclude_users = frozenset(exclude_users)
        self.timeout = timeout
        self.offset = 0
        self._previous: dict[str, object] | None = None

    @property
    def path(self) -> Path:
        if self.node.server.log is None:
            raise RuntimeError(f"{self.node.name} has no log file")
        return Path(self.node.server.log)

    def start(self) -> None:
        """Log every statement with the session and transaction ids; return once the server does."""
        current = self.node.server.settings()
        self._previous = {key: current.get(key) for key in LOG_SETTINGS}
        self.node.server.set_settings(LOG_SETTINGS)
        if self.node.is_running():
            self.node.server.reload()
            self._wait(lambda logging: logging == ("all", LOG_PREFIX), "to log every statement")
        self.offset = self._size()

    def mark(self) -> None:
        """From now on: ``statements()`` leaves out what was logged before."""
        self.offset = self._size()

    def statements(self) -> list[Statement]:
        """What the node logged since ``start()`` or ``mark()`` (every call reads the log again)."""
        try:
            with self.path.open("rb") as f:
                if self._size() >= self.offset:
                    f.seek(self.offset)
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        keep = None
        if self.bouncers:
            connections: dict[str, list[float]] = {}
            for bouncer in self.bouncers:
                log = bouncer.config_path.parent / "pgbouncer.log"
                try:
                    found = bouncer_connections(log.read_text(encoding="utf-8", errors="replace"))
                except FileNotFoundError:
                    continue
                for port, times in found.items():
                    connections.setdefault(port, []).extend(times)
            keep = through_bouncer(connections)
        return parse_log(text, node=self.node.name, exclude_users=self.exclude_users, keep=keep)

    def stop(self) -> None:
        """Put the logging settings back as they were (and reload, and wait for it, if the server runs)."""
        if self._previous is None:
            return
        previous, self._previous = self._previous, None
        self.node.server.set_settings(previous)
        if self.node.is_running():
            self.node.server.reload()
            if previous != LOG_SETTINGS:
                try:
                    self._wait(lambda logging: logging != ("all", LOG_PREFIX), "to stop logging every statement")
                except Exception as exc:  # the settings are back in the file; the server will follow
                    logger.warning("%s", exc)

    def _wait(self, done: Callable[[tuple[str, str]], bool], what: str) -> None:
        from ..ops import sql

        def check() -> bool:
            rows = sql.query(self.node.admin_dsn, "SELECT current_setting('log_statement'), "
                                                  "current_setting('log_line_prefix')")
            return done(rows[0])

        sql.wait_until(check, timeout=self.timeout, what=f"{self.node.name} {what}")

    def __enter__(self) -> ServerLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


# --- the SQLAlchemy hook -----------------------------------------------------------------------

_SESSION = "srht_readonly_audit_session"
_serial = itertools.count(1)


class SqlAlchemyRecorder:
    """Records every statement SQLAlchemy sends through ``target`` (an engine, or the ``Engine`` class).

    ``statements`` holds them, unless a ``sink`` takes each one instead. The session is the DBAPI
    connection (``py:PID:N``); the transaction is known from SQLAlchemy's ``begin``/``commit``/
    ``rollback`` events, and None on a connection in autocommit. Engines whose URL names one of
    ``exclude_users`` are not recorded (as ``ServerLog`` leaves those roles out); with
    ``addresses`` (``host:port`` of PgBouncers, a collection that may grow), only engines that
    connect to one of them are.
    """

    def __init__(self, sink: Callable[[Statement], None] | None = None, *,
                 exclude_users: Iterable[str] = ADMIN_USERS, addresses: Collection[str] | None = None) -> None:
        self.exclude_users = frozenset(exclude_users)
        self.addresses = addresses
        self.statements: list[Statement] = []
        self._sink = sink or self.statements.append
        self._lock = threading.Lock()
        self._targets: list[Any] = []
        self._transactions: dict[int, str] = {}

    def install(self, target: Any = None) -> SqlAlchemyRecorder:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        target = Engine if target is None else target
        event.listen(target, "before_cursor_execute", self._before_cursor_execute)
        event.listen(target, "begin", self._begin)
        event.listen(target, "commit", self._end)
        event.listen(target, "rollback", self._end)
        self._targets.append(target)
        return self

    def uninstall(self) -> None:
        from sqlalchemy import event

        for target in self._targets:
            event.remove(target, "before_cursor_execute", self._before_cursor_execute)
            event.remove(target, "begin", self._begin)
            event.remove(target, "commit", self._end)
            event.remove(target, "rollback", self._end)
        self._targets = []

    # The transaction of each Connection, by its id: ``conn.info`` may not be touched on an
    # invalidated connection (SQLAlchemy would try to reconnect, inside the application's rollback).
    def _begin(self, conn: Any) -> None:
        self._transactions[id(conn)] = f"tx{next(_serial)}"

    def _end(self, conn: Any) -> None:
        self._transactions.pop(id(conn), None)

    def _before_cursor_execute(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                               executemany: bool) -> None:
        try:
            url = conn.engine.url
            if url.username in self.exclude_users:
                return
            if self.addresses is not None and f"{url.host}:{url.port or 5432}" not in self.addresses:
                return
            info = conn.info
            session = info.get(_SESSION)
            if session is None:
                session = info[_SESSION] = f"py:{os.getpid()}:{next(_serial)}"
            dbapi = getattr(conn.connection, "dbapi_connection", None)
            transaction = None if getattr(dbapi, "autocommit", False) else self._transactions.get(id(conn))
            record = Statement(session, transaction, statement, where=caller())
            with self._lock:
                self._sink(record)
        except Exception:  # recording must never break the application
            logger.debug("audit: statement not recorded", exc_info=True)


def _package_dirs() -> tuple[str, ...]:
    dirs = []
    for name in ("sqlalchemy", "psycopg2", "psycopg", "psycopg_binary", "srht_readonly"):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.join(os.path.realpath(location), ""))
            dirs.append(os.path.join(location, ""))
    return tuple(dict.fromkeys(dirs))


_SKIPPED: tuple[str, ...] | None = None


def caller() -> str | None:
    """``file:line in function`` of the innermost frame outside SQLAlchemy, the drivers and srht_readonly."""
    global _SKIPPED
    if _SKIPPED is None:
        _SKIPPED = _package_dirs()
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIPPED) and not filename.startswith("<frozen"):
            return f"{_display(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _display(filename: str) -> str:
    if filename.startswith("<"):
        return filename
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


class JsonLines:
    """A sink appending each statement as one JSON line to ``path``; several processes may share it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self, statement: Statement) -> None:
        line = json.dumps({"session": statement.session, "transaction": statement.transaction,
                           "text": statement.text, "where": statement.where}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8", errors="replace"))  # one write: lines never interleave
        finally:
            os.close(fd)


def read_json_lines(path: str | os.PathLike[str]) -> list[Statement]:
    """The statements a ``JsonLines`` sink wrote (none if the file does not exist)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        try:
            data = json.loads(line)
            found.append(Statement(data["session"], data["transaction"], data["text"], data.get("where")))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a process killed while writing
    return found

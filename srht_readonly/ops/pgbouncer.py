"""PgBouncer: its config file and its process (its admin console is ``console``).

The plan's central move is to repoint every PgBouncer's ``[databases]`` entries at another
node and reload them all at once. This module holds the pieces for one PgBouncer: render and
rewrite the config (the rest of the file is kept as written) and start/stop it as a non-root
user.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import sql
from .errors import ToolMissing
from .remote import LocalHost

# --- config ------------------------------------------------------------------------------------


def render_config(settings: Mapping[str, object], databases: Mapping[str, str]) -> str:
    """A pgbouncer.ini from ``[pgbouncer]`` settings and ``[databases]`` entries."""
    lines = ["[databases]"]
    lines += [f"{name} = {conninfo}" for name, conninfo in databases.items()]
    lines += ["", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_ENTRY = re.compile(r"^(\s*)([^=;#\s][^=]*?)(\s*=\s*)(.*?)\s*$")


def parse_config(text: str) -> dict[str, dict[str, str]]:
    """Sections of an ini file as dicts (keys as written; ``;`` and ``#`` start comments)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.lstrip().startswith((";", "#")):
            continue
        m = _SECTION.match(line)
        if m:
            current = sections.setdefault(m.group(1).strip().lower(), {})
            continue
        e = _ENTRY.match(line)
        if e and current is not None:
            current[e.group(2).strip()] = e.group(4)
    return sections


def parse_conninfo(conninfo: str) -> dict[str, str]:
    """``host=a port=5 dbname='x y'`` -> dict (libpq keyword syntax, quotes honoured).

    Not libpq's own parser (``psycopg2.extensions.parse_dsn``, used for real connection strings
    in ``sql.redact``): a PgBouncer ``[databases]`` entry also carries keys libpq refuses
    (``pool_size``, ``pool_mode``, ``auth_user``, ``max_db_connections``...), and those must be
    kept as they are when the entry is repointed.
    """
    result = {}
    for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", conninfo):
        value = m.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        result[m.group(1)] = value
    return result


def format_conninfo(params: Mapping[str, str]) -> str:
    def q(v: str) -> str:
        return v if v and re.fullmatch(r"[\w.\-/:@]+", v) else "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return " ".join(f"{k}={q(str(v))}" for k, v in params.items())


def repoint(text: str, target: Mapping[str, str], names: Iterable[str] | None = None) -> str:
    """``text`` with the chosen ``[databases]`` entries' host/port replaced by ``target``'s.

    ``names`` None means every entry. Other keys of an entry (dbname, user, pool_size...) and
    every other line of the file, comments included, stay as they were.
    """
    wanted = set(names) if names is not None else None
    out = []
    section = None
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1).strip().lower()
        e = _ENTRY.match(line) if section == "databases" and not m else None
        if e and not line.lstrip().startswith((";", "#")) and (wanted is None or e.group(2).strip() in wanted):
            params = parse_conninfo(e.group(4))
            params.update(target)
            line = f"{e.group(1)}{e.group(2)}{e.group(3)}{format_conninfo(params)}"
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def targets(text: str, names: Iterable[str] | None = None) -> dict[str, tuple[str, str]]:
    """Which host and port each ``[databases]`` entry points at, per the file."""
    dbs = parse_config(text).get("databases", {})
    wanted = set(names) if names is not None else None
    result = {}
    for name, conninfo in dbs.items():
        if wanted is None or name in wanted:
            p = parse_conninfo(conninfo)
            result[name] = (p.get("host", ""), p.get("port", "5432"))
    return result


# --- process -----------------------------------------------------------------------------------


def find_pgbouncer() -> str:
    path = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if path is None:
        raise ToolMissing("pgbouncer", "pgbouncer", "$PATH and /usr/sbin")
    return path


@dataclass
class PgBouncerProcess:
    """A PgBouncer daemon started from ``config`` as ``os_user`` (it refuses to run as root)."""

    config: Path
    pidfile: Path
    os_user: str = "postgres"
    host: LocalHost = field(default_factory=LocalHost)

    def start(self, *, timeout: float = 10) -> None:
        """Start daemonised (``-d``) and wait for its pidfile."""
        if self.is_running():
            return
        self.host.run([find_pgbouncer(), "-d", str(self.config)], user=self.os_user, timeout=timeout)
        sql.wait_until(self.pid, timeout=timeout, what=f"pgbouncer to write {self.pidfile}")

    def pid(self) -> int | None:
        try:
            text = self.host.read_text(self.pidfile).strip()
        except (FileNotFoundError, PermissionError):
            return None
        if not text.isdigit():
            return None
        try:
            os.kill(int(text), 0)
        except ProcessLookupError:
            return None
        return int(text)

    def is_running(self) -> bool:
        return self.pid() is not None

    def stop(self, *, timeout: float = 10) -> None:
        """Immediate shutdown (SIGTERM): clients are disconnected, PgBouncer exits."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _gone(pid):
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited; a zombie (daemons are reaped by init, sometimes seconds later) counts."""
    if not os.path.isdir("/proc"):  # not Linux: signal 0 is all we have
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True

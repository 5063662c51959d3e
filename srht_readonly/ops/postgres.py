"""One PostgreSQL server's data directory and process: initdb, start, stop, kill, settings.

Everything runs as the data directory's OS user (PostgreSQL refuses root), through a host
(``remote.LocalHost`` here), so the same code drives a local lab and a production node.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CommandFailed, OpsError, ToolMissing
from .remote import LocalHost
from .versions import Pg, parse_major

STOP_MODES = ("smart", "fast", "immediate")


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding ``pg_ctl``: ``explicit``, else ``$PATH``, else Debian's newest."""
    if explicit:
        path = Path(explicit)
        if not (path / "pg_ctl").exists():
            raise ToolMissing("pg_ctl", "postgresql", str(path))
        return path
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(re.findall(r"/(\d+)/bin", p)[0]),
    )
    if not candidates:
        raise ToolMissing("pg_ctl", "postgresql", "$PATH and /usr/lib/postgresql/*/bin")
    return Path(candidates[-1]).parent


@dataclass
class PostgresServer:
    """A data directory and the postmaster that serves it.

    ``os_user`` defaults to the owner of ``data`` (or ``postgres`` before initdb).
    """

    data: Path
    bin: Path = field(default_factory=find_bin_dir)
    host: LocalHost = field(default_factory=LocalHost)
    os_user: str | None = None
    log: Path | None = None
    _major: tuple[Path, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.bin = Path(self.bin)
        if self.os_user is None:
            self.os_user = self.host.owner(self.data) if self.host.exists(self.data) else "postgres"

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def major(self) -> int:
        """The major version of the binaries in ``bin`` (``postgres --version``, run once per ``bin``)."""
        if self._major is None or self._major[0] != self.bin:
            self._major = (self.bin, parse_major(self.run("postgres", "--version", timeout=30).stdout))
        return self._major[1]

    def pg(self) -> Pg:
        """What differs on the binaries' major (``versions.Pg``): settings written before a start, initdb."""
        return Pg(self.major())

    def run(self, name: str, *args: object, timeout: float | None = 120, check: bool = True):  # type: ignore[no-untyped-def]
        """Run one of PostgreSQL's programs (``pg_ctl``, ``pg_controldata``...) as the OS user."""
        return self.host.run(
            [self.tool(name), *map(str, args)], user=self.os_user, timeout=timeout, check=check
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def initdb(self, *, auth: str = "trust", checksums: bool | None = None, options: tuple[str, ...] = ()) -> None:
        """Create the cluster (UTF-8, no fsync during creation: it is synced by the next checkpoint).

        ``checksums``: data page checksums on or off whatever the major's default (off before 18,
        on from 18); None keeps that default.
        """
        if self.host.exists(self.data / "PG_VERSION"):
            raise OpsError(f"{self.data} already holds a cluster; refusing to initdb over it")
        checksum_options = self.pg().initdb_checksums(checksums) if checksums is not None else ()
        self.host.make_dir(self.data, owner=self.os_user, mode=0o700)
        self.run("initdb", "-D", self.data, "--auth", auth, "-E", "UTF8", "--locale", "C.UTF-8",
                 "--no-sync", "-U", "postgres", *checksum_options, *options)

    def is_running(self) -> bool:
        """True while a postmaster serves this data directory.

        A killed postmaster stays a zombie until init reaps it (some containers do so only every few
        seconds); pg_ctl and postgres itself take a zombie for alive, so wait for the reaping first.
        """
        self.wait_reaped()
        proc = self.run("pg_ctl", "status", "-D", self.data, check=False, timeout=30)
        return proc.returncode == 0

    def wait_reaped(self, timeout: float = 30) -> None:
        """Return once the postmaster named in ``postmaster.pid`` is not a zombie (or there is none)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            if not self._process_state(pid).startswith("Z"):
                return
            if time.monotonic() > deadline:
                raise OpsError(f"{self.data}: postmaster {pid} killed but not reaped after {timeout:.0f} s")
            time.sleep(0.05)

    def start(self, *, timeout: float = 60) -> None:
        """Start and wait until it accepts connections (a hot standby: until consistent)."""
        args: list[object] = ["start", "-D", self.data, "-w", "-t", int(timeout)]
        if self.log is not None:
            args += ["-l", self.log]
        try:
            self.run("pg_ctl", *args, timeout=timeout + 10)
        except CommandFailed as exc:
            raise OpsError(f"{self.data}: start failed; {self._log_tail()}") from exc

    def stop(self, mode: str = "fast", *, timeout: float = 60) -> None:
        """Stop with ``smart``, ``fast`` or ``immediate`` shutdown; a stopped server is left alone."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}, not {mode!r}")
        if not self.is_running():
            return
        self.run("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", int(timeout),
                 timeout=timeout + 10)

    def restart(self, mode: str = "fast", *, timeout: float = 60) -> None:
        self.stop(mode, timeout=timeout)
        self.start(timeout=timeout)

    def postmaster_pid(self) -> int | None:
        """The postmaster's PID from ``postmaster.pid``, or None when there is none."""
        try:
            text = self.host.read_text(self.data / "postmaster.pid")
        except (FileNotFoundError, PermissionError):
            return None
        first = text.split("\n", 1)[0].strip()
        return int(first) if first.isdigit() else None

    def kill(self, *, timeout: float = 10) -> None:
        """``kill -9`` the postmaster, as a crash would; backends notice and exit by themselves.

        Returns once the postmaster is gone (a zombie counts), so the caller acts on a crashed
        server; raises ``OpsError`` if it cannot be killed or is still there after ``timeout``.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        if not isinstance(self.host, LocalHost):
            killed = self.host.run(["kill", "-9", str(pid)], user=self.os_user, check=False)
            if killed.returncode != 0 and self._alive_on_host(pid):
                raise OpsError(f"{self.data}: kill -9 {pid} on {self.host.name} failed: "
                               f"{(killed.stderr or killed.stdout).strip() or f'exit {killed.returncode}'}")
            deadline = time.monotonic() + timeout
            while self._alive_on_host(pid):
                if time.monotonic() > deadline:
                    raise OpsError(f"{self.data}: postmaster {pid} on {self.host.name} still running "
                                   f"{timeout:.0f} s after kill -9")
                time.sleep(0.05)
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        _wait_gone(pid)

    def _alive_on_host(self, pid: int) -> bool:
        """Whether ``pid`` runs on the server's host (a zombie, killed but not yet reaped, does not)."""
        state = self._process_state(pid)
        return bool(state) and not state.startswith("Z")

    def _process_state(self, pid: int) -> str:
        """``ps``'s state letters for ``pid`` on the server's host ("" when there is no such process)."""
        return str(self.host.run(["ps", "-o", "stat=", "-p", str(pid)], check=False).stdout.strip())

    def reload(self) -> None:
        self.run("pg_ctl", "reload", "-D", self.data)

    # --- state on disk -----------------------------------------------------------------------

    def controldata(self) -> dict[str, str]:
        """``pg_controldata`` as a dict (``Database cluster state``, ``Latest checkpoint location``...)."""
        out = self.run("pg_controldata", "-D", self.data).stdout
        result = {}
        for line in out.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                result[key.strip()] = value.strip()
        return result

    def set_settings(self, settings: dict[str, object]) -> None:
        """Merge ``settings`` into ``postgresql.auto.conf`` (read last, like ``ALTER SYSTEM``).

        Usable while the server is stopped, which ``ALTER SYSTEM`` is not; a value of None
        removes the setting.
        """
        path = self.data / "postgresql.auto.conf"
        text = self.host.read_text(path) if self.host.exists(path) else ""
        self.host.write_text_atomic(path, merge_conf(text, settings), owner=self.os_user, mode=0o600)

    def settings(self) -> dict[str, str]:
        """What ``postgresql.auto.conf`` sets."""
        path = self.data / "postgresql.auto.conf"
        text = self.host.read_text(path) if self.host.exists(path) else ""
        return parse_conf(text)

    def write_file(self, name: str, text: str, *, mode: int = 0o600) -> None:
        """Write a file inside the data directory, owned by the OS user."""
        self.host.write_text_atomic(self.data / name, text, owner=self.os_user, mode=mode)

    def _log_tail(self, lines: int = 10) -> str:
        if self.log is None or not self.host.exists(self.log):
            return "see the server log"
        tail = self.host.read_text(self.log).strip().splitlines()[-lines:]
        return "server log says:\n" + "\n".join(tail)


# key, optional '=', then a quoted value (which may hold '#') or a bare word; '#' starts a comment.
_CONF_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?\s*('(?:[^'\\]|''|\\.)*'|[^#\s]+)")


def parse_conf(text: str) -> dict[str, str]:
    """``key = 'value'`` lines of a postgresql.conf-style file, unquoted, comments ignored."""
    result = {}
    for line in text.splitlines():
        m = _CONF_LINE.match(line)
        if m:
            result[m.group(1)] = _unquote(m.group(2))
    return result


def merge_conf(text: str, settings: dict[str, object]) -> str:
    """``text`` with ``settings`` replaced in place or appended; None deletes a key."""
    remaining = dict(settings)
    out = []
    for line in text.splitlines():
        m = _CONF_LINE.match(line)
        key = m.group(1) if m else None
        if key in remaining:
            value = remaining.pop(key)
            if value is not None:
                out.append(f"{key} = {quote_conf(value)}")
            continue
        out.append(line)
    out += [f"{k} = {quote_conf(v)}" for k, v in remaining.items() if v is not None]
    return "\n".join(out) + "\n"


def quote_conf(value: object) -> str:
    """A value as postgresql.conf wants it: numbers and booleans bare, strings quoted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return value[1:-1].replace("''", "'").replace("\\\\", "\\")
    return value


def _wait_gone(pid: int, timeout: float = 10) -> None:
    """Wait until ``pid`` has exited (a zombie waiting for its parent to reap it counts as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.01)

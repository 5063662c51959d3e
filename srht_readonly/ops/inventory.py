"""The INI inventory: which PostgreSQL nodes and PgBouncers make up the fleet, and how to reach them.

Roles are never declared here: who is the primary is observed (``pg_is_in_recovery()``) each
time a command runs. The format (docs/cli.md)::

    [node remilia]
    dsn = host=10.0.0.2 port=5432 user=postgres dbname=postgres   ; how ops reaches it
    data = /var/lib/postgresql/12/data
    ssh = remilia.example.org        ; absent: this machine
    bin = /usr/lib/postgresql/12/bin ; optional
    os-user = postgres               ; optional
    target = host=10.0.0.2 port=5432 ; optional: how PgBouncers reach it (default: from dsn)

    [pgbouncer git.sr.ht]
    ssh = git.sr.ht.example.org      ; absent: this machine
    config = /etc/pgbouncer/pgbouncer.ini
    admin = host=127.0.0.1 port=16432 user=pgbouncer dbname=pgbouncer  ; as seen from its host
    databases = git.sr.ht, meta.sr.ht ; entries that follow the primary (default: all)

    [replication]
    user = replicator
    password-file = /etc/sr.ht/replication.password

    [service git.sr.ht]              ; a host running services (for ``announce``)
    ssh = git.sr.ht.example.org      ; absent: this machine
    announcement = /run/sr.ht/announcement   ; the file its processes read ($SRHT_READONLY_ANNOUNCE_FILE)

    [hooks]
    command = /usr/local/bin/srht-event   ; run at each procedure step, a JSON event on stdin

    [backup]                         ; the backup engine (Barman) for ``backup`` and ``past``
    config = /etc/barman.conf        ; barman -c
    server = srht                    ; the Barman server that backs up the primary
    barman = /opt/srht-readonly/barman/bin/barman   ; optional (default: barman on $PATH)
    ssh = backup.example.org         ; optional: where Barman runs (absent: this machine)
    past-dir = /var/tmp/srht-readonly-past   ; optional: where ``past`` makes its instances
    bin = /usr/lib/postgresql/15/bin ; optional: the PostgreSQL that runs them (default: a node's)

    [status]                         ; optional: thresholds of ``status`` (and of the exporter's problems)
    slow-commit = 0.1                ; seconds a tiny commit on the primary may take (median of 3)

    [etcd]                           ; optional: the fleet-wide operator lock (``ops.etcd``)
    endpoints = http://10.0.0.5:2379, http://10.0.0.6:2379, http://10.0.0.7:2379
    prefix = /srht-readonly          ; optional: the keys' prefix
    lock-ttl = 10                    ; optional: seconds the lock outlives a holder that died (5-600)

    [agent]                          ; optional: what ``agent --auto-promote`` needs (``ops.autopromote``)
    ; the command that stops the old primary for good, $SRHT_READONLY_FENCE_NODE naming it: exit 0 = stopped
    ; (values here are kept whole: no comment after them)
    fence = ssh root@db-$SRHT_READONLY_FENCE_NODE systemctl kill -s KILL postgresql
    fence-timeout = 10
    max-lag = 16MB

Lines starting with ``;`` or ``#`` are comments; so is `` ;...`` or `` #...`` after a value, except
in the sections the drill reads (``[drill]``, ``[probe NAME]``: ``OTHER_SECTIONS``) and in ``[hooks]``
and ``[agent]``, whose values are shell commands and regular expressions kept whole
(``command = cd /srv/x ; git push``).

A malformed file raises ``InventoryError`` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2.extensions

from .errors import OpsError

DEFAULT_PATH = "/etc/sr.ht/readonly.ini"
ENV_VAR = "SRHT_READONLY_CONFIG"

#: A node's name is also the name of its replication slot on the other nodes.
NODE_NAME = re.compile(r"[a-z0-9_]{1,63}")
BOUNCER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")  # also names its dead-man timer's files
NODE_KEYS = {"dsn": True, "data": True, "ssh": False, "bin": False, "os-user": False, "target": False}
BOUNCER_KEYS = {"config": True, "admin": True, "ssh": False, "databases": False}
REPLICATION_KEYS = {"user": False, "password-file": False}
SERVICE_KEYS = {"announcement": True, "ssh": False}
HOOKS_KEYS = {"command": True}
STATUS_KEYS = {"slow-commit": False}
ETCD_KEYS = {"endpoints": True, "prefix": False, "lock-ttl": False}
AGENT_KEYS = {"fence": True, "fence-timeout": False, "max-lag": False}
_SIZE_UNITS = {"": 1, "B": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3}
BACKUP_KEYS = {"config": True, "server": True, "barman": False, "ssh": False, "past-dir": False, "bin": False}
# Sections the procedures ignore and the drill reads (srht_readonly/drill/config.py): kind -> takes a name.
OTHER_SECTIONS = {"drill": False, "probe": True}


class InventoryError(OpsError):
    """The inventory is missing or malformed (exit status 2)."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class NodeSpec:
    """A PostgreSQL server: how ops reaches it (``dsn``), where its data is, and how PgBouncers reach it."""

    name: str
    dsn: str
    data: str
    target: dict[str, str]
    ssh: str | None = None
    bin: str | None = None
    os_user: str | None = None
    line: int = 0

    @property
    def address(self) -> str:
        """The host PgBouncers and other nodes connect to (``target``'s host)."""
        return self.target["host"]

    @property
    def port(self) -> str:
        return self.target.get("port", "5432")


@dataclass(frozen=True)
class BouncerSpec:
    """A PgBouncer: its config file and admin console, both as seen from its own host."""

    name: str
    config: str
    admin: str
    ssh: str | None = None
    databases: tuple[str, ...] | None = None
    line: int = 0


@dataclass(frozen=True)
class ReplicationSpec:
    """The role standbys stream as; its password lives in a file, never in argv or logs."""

    user: str = "replicator"
    password_file: str | None = None

    def password(self) -> str | None:
        """The password from ``password-file`` (first line), or None when there is no file."""
        if self.password_file is None:
            return None
        try:
            text = Path(self.password_file).read_text()
        except OSError as exc:
            raise OpsError(
                f"cannot read the replication password from {self.password_file}: {exc.strerror}; "
                f"create it (mode 600) or remove password-file from [replication]"
            ) from exc
        first = text.splitlines()[0] if text.strip() else ""
        if not first:
            raise OpsError(f"{self.password_file} is empty; put the replication password on its first line")
        return first


@dataclass(frozen=True)
class ServiceSpec:
    """A host running SourceHut services: where their processes read the announcement file."""

    name: str
    announcement: str
    ssh: str | None = None
    line: int = 0


@dataclass(frozen=True)
class BackupSpec:
    """``[backup]``: the Barman server that backs up the fleet's primary, and where ``past`` runs instances."""

    config: str
    server: str
    barman: str = "barman"
    ssh: str | None = None
    past_dir: str = "/var/tmp/srht-readonly-past"
    bin: str | None = None
    line: int = 0


@dataclass(frozen=True)
class StatusSpec:
    """``[status]``: thresholds of ``status``'s checks."""

    #: Seconds a tiny commit on the primary (``sql.commit_seconds``, the median of three) may take
    #: before ``status`` warns of a slow primary (a soft outage: a resilver, a saturated disk or CPU).
    slow_commit: float = 0.1


@dataclass(frozen=True)
class EtcdSpec:
    """``[etcd]``: the etcd cluster holding the fleet-wide operator lock (``ops.etcd``)."""

    endpoints: tuple[str, ...]
    prefix: str = "/srht-readonly"
    lock_ttl: int = 10
    line: int = 0


@dataclass(frozen=True)
class AgentSpec:
    """``[agent]``: how ``agent --auto-promote`` fences the old primary, and how far behind a standby may be."""

    fence: str
    fence_timeout: float = 10.0
    max_lag: int = 16 * 1024**2
    line: int = 0


@dataclass(frozen=True)
class HooksSpec:
    """``[hooks]``: a shell command run at each procedure step with a JSON event on stdin."""

    command: str | None = None


@dataclass(frozen=True)
class Inventory:
    """The parsed file: nodes and PgBouncers in file order, and the replication settings."""

    path: str
    nodes: dict[str, NodeSpec]
    pgbouncers: dict[str, BouncerSpec]
    replication: ReplicationSpec = field(default_factory=ReplicationSpec)
    # Sections other tools read (the drill's [drill] and [probe NAME]): {(kind, name): {key: (value, line)}}.
    others: dict[tuple[str, str | None], dict[str, tuple[str, int]]] = field(default_factory=dict)
    services: dict[str, ServiceSpec] = field(default_factory=dict)
    hooks: HooksSpec = field(default_factory=HooksSpec)
    backup: BackupSpec | None = None
    status: StatusSpec = field(default_factory=StatusSpec)
    etcd: EtcdSpec | None = None
    agent: AgentSpec | None = None

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; ``InventoryError`` listing the known ones otherwise."""
        try:
            return self.nodes[name]
        except KeyError:
            raise InventoryError(self.path, None, f"no [node {name}] here; nodes: {', '.join(self.nodes)}") from None

    def node_at(self, host: str | None, port: str | int | None) -> NodeSpec | None:
        """The node whose ``target`` is ``host:port`` (how a PgBouncer entry names it), if any."""
        for node in self.nodes.values():
            if node.address == host and node.port == str(port or "5432"):
                return node
        return None


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$SRHT_READONLY_CONFIG``, else ``/etc/sr.ht/readonly.ini``."""
    return Path(explicit or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load(path: str | os.PathLike[str]) -> Inventory:
    """Read and check the inventory at ``path``."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InventoryError(path, None, f"no such file; pass --config FILE or set ${ENV_VAR}") from None
    except OSError as exc:
        raise InventoryError(path, None, f"cannot read it: {exc.strerror}") from None
    return parse(text, str(path))


_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\](?:\s+[;#].*)?$")  # a comment may follow the header
_ENTRY = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.*)$")
_INLINE_COMMENT = re.compile(r"\s+[;#].*$")


def parse(text: str, path: str = "<inventory>") -> Inventory:
    """Parse inventory ``text``; ``path`` is only used in error messages."""
    sections: list[tuple[str, str | None, int, dict[str, tuple[str, int]]]] = []
    seen: dict[tuple[str, str | None], int] = {}
    current: dict[str, tuple[str, int]] | None = None
    current_kind: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith((";", "#")):
            continue
        m = _SECTION.match(line)
        if m:
            kind, name = _section_kind(m.group(1), path, number)
            if (kind, name) in seen:
                raise InventoryError(path, number, f"[{m.group(1)}] appears twice (first at line {seen[kind, name]})")
            seen[kind, name] = number
            current, current_kind = {}, kind
            sections.append((kind, name, number, current))
            continue
        # The drill's values are shell commands and regexes, where " ;" and " #" mean something.
        whole = current_kind in OTHER_SECTIONS or current_kind in ("hooks", "agent")
        e = _ENTRY.match(line if whole else _INLINE_COMMENT.sub("", line))
        if not e:
            raise InventoryError(path, number, f"expected 'key = value' or a [section], got {line!r}")
        if current is None:
            raise InventoryError(path, number, f"{e.group(1)!r} is outside any section; put it under [node NAME], "
                                               f"[pgbouncer NAME] or [replication]")
        key, value = e.group(1).lower(), e.group(2).strip()
        if key in current:
            first = current[key][1]
            raise InventoryError(path, number, f"{key!r} is set twice in this section (first at line {first})")
        current[key] = (value, number)

    nodes: dict[str, NodeSpec] = {}
    bouncers: dict[str, BouncerSpec] = {}
    replication = ReplicationSpec()
    services: dict[str, ServiceSpec] = {}
    hooks = HooksSpec()
    backup: BackupSpec | None = None
    status = StatusSpec()
    etcd: EtcdSpec | None = None
    agent: AgentSpec | None = None
    others: dict[tuple[str, str | None], dict[str, tuple[str, int]]] = {}
    for kind, name, number, entries in sections:
        if kind in OTHER_SECTIONS:
            others[kind, name] = {**entries, "": ("", number)}  # "" keeps the header's line for messages
        elif kind == "node":
            assert name is not None
            nodes[name] = _node(name, number, entries, path)
        elif kind == "pgbouncer":
            assert name is not None
            bouncers[name] = _bouncer(name, number, entries, path)
        elif kind == "service":
            assert name is not None
            services[name] = _service(name, number, entries, path)
        elif kind == "hooks":
            _check_keys(entries, HOOKS_KEYS, "[hooks]", number, path)
            hooks = HooksSpec(command=entries["command"][0])
        elif kind == "backup":
            backup = _backup(number, entries, path)
        elif kind == "status":
            status = _status(number, entries, path)
        elif kind == "etcd":
            etcd = _etcd(number, entries, path)
        elif kind == "agent":
            agent = _agent(number, entries, path)
        else:
            _check_keys(entries, REPLICATION_KEYS, "[replication]", number, path)
            replication = ReplicationSpec(
                user=entries["user"][0] if "user" in entries else "replicator",
                password_file=entries["password-file"][0] if "password-file" in entries else None,
            )
    if not nodes:
        raise InventoryError(path, None, "no [node NAME] section; describe at least the primary and the standby")
    targets: dict[tuple[str, str], str] = {}
    for node in nodes.values():
        key = (node.address, node.port)
        if key in targets:
            raise InventoryError(path, node.line, f"nodes {targets[key]} and {node.name} have the same target "
                                                  f"{node.address}:{node.port}; set target = to tell them apart")
        targets[key] = node.name
    return Inventory(path, nodes, bouncers, replication, others, services, hooks, backup, status, etcd, agent)


def _section_kind(header: str, path: str, number: int) -> tuple[str, str | None]:
    parts = header.split()
    if parts in (["replication"], ["hooks"], ["backup"], ["status"], ["etcd"], ["agent"]):
        return parts[0], None
    if parts and parts[0] in OTHER_SECTIONS and len(parts) == (2 if OTHER_SECTIONS[parts[0]] else 1):
        return parts[0], (parts[1] if len(parts) == 2 else None)
    if len(parts) == 2 and parts[0] in ("node", "pgbouncer", "service"):
        return parts[0], parts[1]
    if len(parts) == 1 and parts[0] in ("node", "pgbouncer", "service"):
        raise InventoryError(path, number, f"[{header}] needs a name, e.g. [{parts[0]} remilia]")
    raise InventoryError(path, number, f"unknown section [{header}]; expected [node NAME], [pgbouncer NAME], "
                                       f"[service NAME], [replication], [hooks], [backup], [status], [etcd] or [agent] "
                                       f"(the drill also reads [drill] and [probe NAME])")


def _check_keys(entries: dict[str, tuple[str, int]], allowed: dict[str, bool], section: str, number: int,
                path: str) -> None:
    for key, (value, line) in entries.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
            raise InventoryError(path, line, f"unknown key {key!r} in {section}{hint}")
        if not value:
            raise InventoryError(path, line, f"{key!r} is empty; give it a value or remove the line")
    for key, required in allowed.items():
        if required and key not in entries:
            raise InventoryError(path, number, f"{section} has no {key!r}; it is required")


def _conninfo(value: str, key: str, line: int, path: str) -> dict[str, str]:
    try:
        return dict(psycopg2.extensions.parse_dsn(value))
    except psycopg2.ProgrammingError as exc:
        raise InventoryError(path, line, f"{key} is not a libpq connection string: {str(exc).strip()}") from None


def _port(params: dict[str, str], key: str, line: int, path: str) -> None:
    """A port libpq and PgBouncer can use (it is written into every pgbouncer.ini)."""
    port = params.get("port")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise InventoryError(path, line, f"{key} has port={port!r}; a port is a number from 1 to 65535")


def _ssh(entries: dict[str, tuple[str, int]], path: str) -> str | None:
    """The ``ssh`` destination; one starting with ``-`` would be read by ssh as an option."""
    if "ssh" not in entries:
        return None
    value, line = entries["ssh"]
    if value.startswith("-"):
        raise InventoryError(path, line, f"ssh = {value!r} starts with '-', which ssh reads as an option; "
                                         "give a host name or an ssh_config alias")
    return value


def _node(name: str, number: int, entries: dict[str, tuple[str, int]], path: str) -> NodeSpec:
    section = f"[node {name}]"
    if not NODE_NAME.fullmatch(name):
        raise InventoryError(path, number, f"[node {name}]: a node's name is also its replication slot's name, "
                                           "so it must be 1 to 63 of a-z, 0-9 and _")
    _check_keys(entries, NODE_KEYS, section, number, path)
    dsn, dsn_line = entries["dsn"]
    params = _conninfo(dsn, "dsn", dsn_line, path)
    _port(params, "dsn", dsn_line, path)
    if "target" in entries:
        value, line = entries["target"]
        target = _conninfo(value, "target", line, path)
        _port(target, "target", line, path)
        if "host" not in target:
            raise InventoryError(path, line, "target has no host=; PgBouncers need a host to connect to")
    else:
        if "host" not in params or params["host"].startswith("/"):
            raise InventoryError(path, dsn_line, "dsn has no TCP host, so PgBouncers cannot use it; add a "
                                                 "target = host=... port=... line")
        target = {"host": params["host"], "port": params.get("port", "5432")}
    data, data_line = entries["data"]
    if not data.startswith("/"):
        raise InventoryError(path, data_line, f"data must be an absolute path, not {data!r}")
    return NodeSpec(
        name=name, dsn=dsn, data=data, target={"host": target["host"], "port": target.get("port", "5432")},
        ssh=_ssh(entries, path), bin=_opt(entries, "bin"), os_user=_opt(entries, "os-user"), line=number,
    )


def _bouncer(name: str, number: int, entries: dict[str, tuple[str, int]], path: str) -> BouncerSpec:
    section = f"[pgbouncer {name}]"
    if not BOUNCER_NAME.fullmatch(name):
        raise InventoryError(path, number, f"{section}: a PgBouncer's name also names files on its host, so it "
                                           "must be 1 to 63 of A-Z, a-z, 0-9, '_', '.' and '-', not starting with "
                                           "'.' or '-'")
    _check_keys(entries, BOUNCER_KEYS, section, number, path)
    admin, admin_line = entries["admin"]
    params = _conninfo(admin, "admin", admin_line, path)
    _port(params, "admin", admin_line, path)
    if params.get("dbname") != "pgbouncer":
        raise InventoryError(path, admin_line, "admin must connect to PgBouncer's console: add dbname=pgbouncer")
    config, config_line = entries["config"]
    if not config.startswith("/"):
        raise InventoryError(path, config_line, f"config must be an absolute path, not {config!r}")
    databases: tuple[str, ...] | None = None
    if "databases" in entries:
        value, line = entries["databases"]
        databases = tuple(d.strip() for d in value.split(",") if d.strip())
        if not databases:
            raise InventoryError(path, line, "databases lists no database; remove the line to mean all of them")
    return BouncerSpec(name=name, config=config, admin=admin, ssh=_ssh(entries, path), databases=databases,
                       line=number)


def _service(name: str, number: int, entries: dict[str, tuple[str, int]], path: str) -> ServiceSpec:
    _check_keys(entries, SERVICE_KEYS, f"[service {name}]", number, path)
    announcement, line = entries["announcement"]
    if not announcement.startswith("/"):
        raise InventoryError(path, line, f"announcement must be an absolute path, not {announcement!r}")
    return ServiceSpec(name=name, announcement=announcement, ssh=_ssh(entries, path), line=number)


def _backup(number: int, entries: dict[str, tuple[str, int]], path: str) -> BackupSpec:
    _check_keys(entries, BACKUP_KEYS, "[backup]", number, path)
    for key in ("config", "past-dir", "bin"):
        if key in entries and not entries[key][0].startswith("/"):
            raise InventoryError(path, entries[key][1], f"{key!r} must be an absolute path, not {entries[key][0]!r}")
    server = entries["server"][0]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", server):
        raise InventoryError(path, entries["server"][1], f"server {server!r} is not a Barman server name "
                                                         "(letters, digits, '_', '.', '-')")
    return BackupSpec(config=entries["config"][0], server=server, barman=_opt(entries, "barman") or "barman",
                      ssh=_ssh(entries, path), past_dir=_opt(entries, "past-dir") or BackupSpec.past_dir,
                      bin=_opt(entries, "bin"), line=number)


def _etcd(number: int, entries: dict[str, tuple[str, int]], path: str) -> EtcdSpec:
    _check_keys(entries, ETCD_KEYS, "[etcd]", number, path)
    value, line = entries["endpoints"]
    endpoints = tuple(e.strip().rstrip("/") for e in value.split(",") if e.strip())
    for e in endpoints:
        if not re.fullmatch(r"https?://[^/\s:]+:\d+", e):
            raise InventoryError(path, line, f"endpoint {e!r} is not http(s)://HOST:PORT (etcd's client URL)")
    if not endpoints:
        raise InventoryError(path, line, "endpoints needs at least one etcd client URL, e.g. http://10.0.0.5:2379")
    prefix = _opt(entries, "prefix") or EtcdSpec.prefix
    if not prefix.startswith("/") or prefix.endswith("/"):
        raise InventoryError(path, entries["prefix"][1], f"prefix must start with '/' and not end with one, "
                                                         f"not {prefix!r}")
    ttl = EtcdSpec.lock_ttl
    if "lock-ttl" in entries:
        text, at = entries["lock-ttl"]
        if not text.isdigit() or not 5 <= int(text) <= 600:
            raise InventoryError(path, at, f"lock-ttl must be whole seconds from 5 to 600, not {text!r}")
        ttl = int(text)
    return EtcdSpec(endpoints, prefix, ttl, number)


def _agent(number: int, entries: dict[str, tuple[str, int]], path: str) -> AgentSpec:
    _check_keys(entries, AGENT_KEYS, "[agent]", number, path)
    fence = entries["fence"][0].strip()  # never empty: _check_keys refuses an empty value
    timeout = AgentSpec.fence_timeout
    if "fence-timeout" in entries:
        text, at = entries["fence-timeout"]
        try:
            timeout = float(text)
        except ValueError:
            timeout = -1.0
        if not 1 <= timeout <= 300:
            raise InventoryError(path, at, f"fence-timeout must be seconds from 1 to 300, not {text!r}")
    max_lag = AgentSpec.max_lag
    if "max-lag" in entries:
        text, at = entries["max-lag"]
        m = re.fullmatch(r"(\d+)\s*(|B|kB|MB|GB)", text.strip())
        if m is None:
            raise InventoryError(path, at, f"max-lag must be a size such as 16MB (B, kB, MB, GB), not {text!r}")
        max_lag = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    return AgentSpec(fence, timeout, max_lag, number)


def _status(number: int, entries: dict[str, tuple[str, int]], path: str) -> StatusSpec:
    _check_keys(entries, STATUS_KEYS, "[status]", number, path)
    if "slow-commit" not in entries:
        return StatusSpec()
    value, line = entries["slow-commit"]
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 3600:
        raise InventoryError(path, line, f"slow-commit must be a number of seconds above 0 (e.g. 0.1), not {value!r}")
    return StatusSpec(slow_commit=seconds)


def _opt(entries: dict[str, tuple[str, int]], key: str) -> str | None:
    return entries[key][0] if key in entries else None

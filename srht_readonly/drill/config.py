"""The drill's part of the inventory, for a run against real hosts (``drill --config FILE``).

The procedures use the inventory's nodes and PgBouncers as every other command does; the drill
also needs to know where to send its own writes and which service probes to play::

    [drill]
    ; the ledger's writes, one URL per PgBouncer (comma-separated); a database the drill may write to
    traffic = postgresql://drill@git.sr.ht.example.org:6432/drill, postgresql://drill@meta.example.org:6432/drill
    ; the major-upgrade scenario (left out without it): the new major's bindir on both nodes' hosts,
    ; and the non-stock column options upgrade --major may remove (comma-separated; see docs/upgrade.md)
    major-to-bin = /usr/lib/postgresql/18/bin
    drop-column-options =

    [probe git-web]
    url = https://git.sr.ht.example.org/~drill/probe
    ; seconds between two tries (default 1)
    every = 1

    [probe git-push]
    command = git -C /srv/drill/probe commit -q --allow-empty -m drill && git -C /srv/drill/probe push -q
    ; a write: judged against the read-only window; a failure whose output matches 'explained'
    ; is the explained refusal, a success matching 'dropped' dropped a write the plan allows to lose
    ; (values here run to the end of the line: ';' and '#' in them are not comments)
    write = yes
    explained = read-only
    dropped = webhooks
    timeout = 20
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import psycopg2.extensions

from ..ops.inventory import Inventory, InventoryError

DRILL_KEYS = {"traffic", "major-to-bin", "drop-column-options"}
PROBE_KEYS = {"url", "method", "data", "command", "write", "explained", "dropped", "every", "timeout"}
DEFAULT_EXPLAINED = r"read[- ]only"


@dataclass(frozen=True)
class ProbeSpec:
    """One service probe: an HTTP request (``url``) or a shell command run on this machine."""

    name: str
    url: str | None = None
    method: str = "GET"
    data: str | None = None
    command: str | None = None
    write: bool = False
    explained: re.Pattern[str] = re.compile(DEFAULT_EXPLAINED, re.I)
    dropped: re.Pattern[str] | None = None
    every: float = 1.0
    timeout: float = 10.0


@dataclass(frozen=True)
class DrillConfig:
    traffic: list[str]
    probes: list[ProbeSpec] = field(default_factory=list)
    major_bin: str | None = None  # the major-upgrade scenario's new bindir; without it, it is not played
    drop_column_options: tuple[str, ...] = ()

    @property
    def database(self) -> str:
        """The database the traffic URLs name (the same on every node)."""
        return _dbname(self.traffic[0]) or ""


def drill_config(inventory: Inventory) -> DrillConfig:
    """Read ``[drill]`` and every ``[probe NAME]``; ``InventoryError`` on anything wrong or missing."""
    path = inventory.path
    drill = inventory.others.get(("drill", None))
    if drill is None:
        raise InventoryError(path, None, "no [drill] section: add 'traffic = postgresql://USER@PGBOUNCER:PORT/DB' "
                                         "(a database the drill may write its ledger to, through each PgBouncer)")
    _check(drill, DRILL_KEYS, "[drill]", path)
    traffic = [u.strip() for u in drill.get("traffic", ("", 0))[0].split(",") if u.strip()]
    if not traffic:
        raise InventoryError(path, drill[""][1], "[drill] needs traffic = URL[, URL...]")
    databases = {_dbname(url) for url in traffic}
    if None in databases or len(databases) != 1:
        raise InventoryError(path, drill["traffic"][1], "[drill] traffic URLs must all name the same database "
                                                        "(postgresql://USER@HOST:PORT/DATABASE): the drill reads its "
                                                        "ledger there on each node to count what survived")
    probes = [_probe(name or "", entries, path) for (kind, name), entries in inventory.others.items()
              if kind == "probe"]
    drop = tuple(o.strip() for o in drill.get("drop-column-options", ("", 0))[0].split(",") if o.strip())
    return DrillConfig(traffic, probes, drill.get("major-to-bin", (None, 0))[0] or None, drop)


def _probe(name: str, entries: dict[str, tuple[str, int]], path: str) -> ProbeSpec:
    section = f"[probe {name}]"
    _check(entries, PROBE_KEYS, section, path)
    value = {k: v for k, (v, _) in entries.items() if k}
    line = entries[""][1]
    if ("url" in value) == ("command" in value):
        raise InventoryError(path, line, f"{section} needs exactly one of url = or command =")
    try:
        spec = ProbeSpec(
            name=name,
            url=value.get("url"),
            method=value.get("method", "POST" if "data" in value else "GET").upper(),
            data=value.get("data"),
            command=value.get("command"),
            write=value.get("write", "no").lower() in ("yes", "true", "on", "1"),
            explained=re.compile(value.get("explained", DEFAULT_EXPLAINED), re.I),
            dropped=re.compile(value["dropped"], re.I) if "dropped" in value else None,
            every=float(value.get("every", 1.0)),
            timeout=float(value.get("timeout", 10.0)),
        )
    except (re.error, ValueError) as exc:
        raise InventoryError(path, line, f"{section}: {exc}") from None
    for key in ("every", "timeout"):
        seconds = getattr(spec, key)
        if not (0 < seconds < float("inf")):  # NaN too
            raise InventoryError(path, entries[key][1], f"{section}: {key} = {seconds:g} must be a number of "
                                                        "seconds above 0")
    return spec


def _check(entries: dict[str, tuple[str, int]], allowed: set[str], section: str, path: str) -> None:
    for key, (_, line) in entries.items():
        if key and key not in allowed:
            raise InventoryError(path, line, f"{section} has no key {key!r}; known: {', '.join(sorted(allowed))}")


def _dbname(url: str) -> str | None:
    try:
        return psycopg2.extensions.parse_dsn(url).get("dbname")
    except psycopg2.ProgrammingError:
        return None

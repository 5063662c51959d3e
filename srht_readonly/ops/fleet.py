"""Every PgBouncer of the inventory, switched as one: the plan's "update all configs, then reload all".

``Fleet.open()`` reaches every PgBouncer first (its host, its config file, its admin console),
so an unreachable one is found before anything changes. The switch then has two phases:

1. ``write()``: the new config of every PgBouncer is written (atomically, mode and owner kept).
   If any host fails, the files already written are put back and nothing is reloaded.
2. ``reload()``: ``RELOAD`` is sent to every console at the same moment, then ``verify()``
   waits until ``SHOW DATABASES`` shows the new target everywhere.

``pause()``/``resume()`` serve the planned switchover. ``keep_pools()`` holds one server of each
busy pool across a repoint's ``RELOAD`` (``upgrade --major``'s window; see its docstring).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg2.extensions

from . import console as consoles
from . import deadman
from .cluster import Cluster
from .errors import OpsError, PartlyDone, Refused
from .inventory import BouncerSpec, Inventory, NodeSpec
from .pgbouncer import parse_config, parse_conninfo, repoint
from .remote import Host

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a keeper may hold its pool's server after the RELOAD when no login to the new target succeeds.
KEEP_AT_MOST = 2.0
#: SHOW SERVERS states of a server connection that has logged in (``new`` is a login in progress).
LOGGED_IN = ("active", "idle", "used", "tested")

WATCHED = ("server_login_retry", "auth_type", "pool_mode", "query_wait_timeout", "listen_addr", "tcp_user_timeout")


@dataclass
class BouncerState:
    """One PgBouncer as observed: where its entries point (running and on disk), paused or not."""

    name: str
    reachable: bool
    error: str | None = None
    target: str | None = None
    file_target: str | None = None
    entries: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    resumed_by_timer: str | None = None  # what its dead-man timer recorded (``status`` only)


@dataclass
class Member:
    """A PgBouncer opened for one operation."""

    spec: BouncerSpec
    host: Host
    text: str | None = None
    console: consoles.Console | None = None
    config: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    has_state: bool = False  # SHOW STATE (PgBouncer 1.19+) tells a global PAUSE; 1.18 only shows per-database ones

    @property
    def name(self) -> str:
        return self.spec.name

    def entries(self) -> list[str]:
        """The ``[databases]`` entries that follow the primary (``databases =``, default all)."""
        names = list(parse_config(self.text or "").get("databases", {}))
        if self.spec.databases is not None:
            return [n for n in names if n in self.spec.databases]
        return names


@dataclass
class Keeper:
    """A client of one pool (database, user) of one PgBouncer holding a server in a transaction."""

    bouncer: str
    database: str
    user: str
    console: consoles.Console
    held: float = 0.0  # seconds from the RELOAD to its release
    released: str | None = None  # why: the new target logged in, or KEEP_AT_MOST ran out

    @property
    def pool(self) -> str:
        return f"{self.bouncer}: {self.database}/{self.user}"


@dataclass
class Change:
    """A config file before and after the repoint."""

    name: str
    old: str
    new: str

    @property
    def changed(self) -> bool:
        return self.old != self.new


class Fleet:
    """The inventory's PgBouncers (or the ``names`` given), for one operation."""

    def __init__(self, cluster: Cluster, names: Iterable[str] | None = None) -> None:
        self.cluster = cluster
        self.inventory: Inventory = cluster.inventory
        chosen = list(names) if names is not None else list(self.inventory.pgbouncers)
        self.members = {n: Member(self.inventory.pgbouncers[n], cluster.host(self.inventory.pgbouncers[n].ssh))
                        for n in chosen}

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for m in self.members.values():
            if m.console is not None:
                m.console.close()

    def reconnect(self, *, timeout: float = 5) -> None:
        """Open again every console that is closed (after ``close()``, or a command that failed)."""
        consoles.connect(_consoles(self.members.values(), unopened=True), timeout=timeout)

    # --- stopping and starting one (a host OS upgrade: ``rolling``) ----------------------------

    def shutdown(self, name: str, *, timeout: float = 30) -> None:
        """``SHUTDOWN`` one PgBouncer (its clients are disconnected) and wait until its console is gone."""
        m = self.members[name]
        if m.console is None:
            raise OpsError(f"PgBouncer {name} was not opened")
        consoles.execute([m.console], "SHUTDOWN", timeout=10)  # the connection drops: that is the answer
        m.console.close()
        probe = consoles.Console(name, m.console.dsn)
        deadline = time.monotonic() + timeout
        while consoles.connect([probe], timeout=2)[name].ok:
            probe.close()
            if time.monotonic() > deadline:
                raise OpsError(f"PgBouncer {name} still answers {timeout:.0f} s after SHUTDOWN")
            time.sleep(0.1)

    def start(self, name: str, *, timeout: float = 30) -> None:
        """Start one PgBouncer again (``pgbouncer -d CONFIG`` as the config file's owner) and reopen its console."""
        m = self.members[name]
        owner = m.host.owner(m.spec.config)  # type: ignore[attr-defined]
        m.host.run(["sh", "-c", 'exec "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" -d "$1"', "sh",
                    m.spec.config], user=owner, timeout=timeout)
        assert m.console is not None
        deadline = time.monotonic() + timeout
        while not consoles.connect([m.console], timeout=2)[name].ok:
            if time.monotonic() > deadline:
                raise OpsError(f"PgBouncer {name} started but its console does not answer after {timeout:.0f} s")
            time.sleep(0.1)

    def drain(self, node: NodeSpec, *, timeout: float = 10) -> dict[str, int]:
        """After a repoint away from ``node``: wait until no PgBouncer holds a server connection to it, so
        stopping it fails no client. What is left, per PgBouncer.

        The repoint's ``RELOAD`` already closed the idle ones and marked the rest to close once released
        (a changed connect string). No ``RECONNECT`` here: it would also close the new connections still
        logging in to the new target, which PgBouncer counts as failed logins, and it then turns away
        every waiting client with "server login has been failing" (seen in the drill: reads failed
        within 20 ms of the fleet's return to an upgraded primary).
        """
        ready = [m for m in self.members.values() if m.error is None and m.console is not None]
        deadline = time.monotonic() + timeout
        while True:
            shown = consoles.execute(_consoles(ready), "SHOW SERVERS", timeout=5)
            left = {name: sum(1 for r in o.rows if str(r.get("port")) == str(node.port)
                              and r.get("addr") in (node.address, "localhost" if node.address == "127.0.0.1" else None))
                    for name, o in shown.items() if o.ok}
            left = {name: n for name, n in left.items() if n}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    # --- holding a server of each pool across a repoint ----------------------------------------

    @contextlib.contextmanager
    def keep_pools(self, node: NodeSpec, *, at_most: float = KEEP_AT_MOST,
                   connect_timeout: float = 2) -> Iterator[list[Keeper]]:
        """Around the ``RELOAD`` that points the fleet at ``node``: one held server in each busy pool.

        PgBouncer 1.18 turns a client away ("server login has been failing, try again later") when
        its pool's last login failed and the pool has no server connection other than logins in
        progress (``check_fast_fail``). A ``RELOAD`` that changes the host closes the logins in
        progress to the old one, and counts each as a failed login; at the end of a read-only window
        logins never stop (each refused write costs a server connection), so one is often under way.
        A server linked to a client in a transaction is neither closed by the ``RELOAD`` (only marked
        to close once released) nor a login, so while one is held the pool's clients wait for the new
        login instead of being turned away.

        So, before the ``RELOAD``: on every PgBouncer, for each pool of a followed database that has
        clients or servers, a client logs in as that pool's user and runs ``BEGIN; SELECT 1``.
        After it (on leaving the ``with``): each keeper is rolled back and closed once ``SHOW
        SERVERS`` lists a logged-in connection of its pool to ``node`` (a login succeeded, which
        clears the failed-login mark), or after ``at_most`` seconds. A pool that cannot be held
        (password not known for its user, ``pool_size`` below 2, the transaction refused) is left
        as it is, with a warning in the log. Yields the keepers (``held``/``released`` filled on exit).
        """
        try:
            keepers = self._take_keepers(connect_timeout)
        except Exception as exc:  # the keepers only make the repoint gentler: never let them stop it
            logger.warning("no pool held across the repoint: %s", exc)
            keepers = []
        try:
            yield keepers
            self._await_logins(keepers, node, at_most=at_most)
        finally:
            self._release(keepers, "the repoint did not finish")

    def _take_keepers(self, timeout: float) -> list[Keeper]:
        ready = [m for m in self.members.values() if m.error is None and m.console is not None]
        pools = consoles.execute(_consoles(ready), "SHOW POOLS", timeout=timeout)
        sizes = consoles.execute(_consoles(ready), "SHOW DATABASES", timeout=timeout)
        wanted: list[Keeper] = []
        for m in ready:
            shown, dbs = pools.get(m.name), sizes.get(m.name)
            if shown is None or not shown.ok or dbs is None or not dbs.ok:
                why = next((o.error for o in (shown, dbs) if o is not None and not o.ok), "no answer")
                logger.warning("PgBouncer %s: no pool held across the repoint (SHOW POOLS/DATABASES: %s)",
                               m.name, why)
                continue
            follows = set(m.entries())
            size = {r["name"]: int(r.get("pool_size") or 0) for r in dbs.rows}
            busy = (r for r in shown.rows if r["database"] != "pgbouncer"
                    and ("*" in follows or r["database"] in follows)
                    and sum(int(r.get(k) or 0) for k in ("cl_active", "cl_waiting", "sv_active", "sv_idle",
                                                         "sv_used", "sv_tested", "sv_login")))
            for r in busy:
                if size.get(r["database"], 0) < 2:
                    # The keeper would hold the pool's only server: no login to the new target could start.
                    logger.warning("PgBouncer %s: pool %s/%s not held across the repoint: pool_size %s",
                                   m.name, r["database"], r["user"], size.get(r["database"], "unknown"))
                    continue
                assert m.console is not None
                dsn = _keeper_dsn(m.console.dsn, r["database"], r["user"], timeout)
                wanted.append(Keeper(m.name, r["database"], r["user"],
                                     consoles.Console(f"{m.name}/{r['database']}/{r['user']}", dsn)))
        by_key = {k.console.key: k for k in wanted}
        failed = {key: o.error for key, o in consoles.connect([k.console for k in wanted], timeout=timeout).items()
                  if not o.ok}
        began = consoles.execute([k.console for k in wanted if k.console.key not in failed], "BEGIN; SELECT 1",
                                 timeout=timeout)
        failed.update({key: o.error for key, o in began.items() if not o.ok})
        for key, why in failed.items():
            by_key[key].console.close()
            logger.warning("PgBouncer %s: pool not held across the repoint (if a login is under way at the "
                           "RELOAD, its clients may be turned away): %s", by_key[key].pool, why)
        return [k for k in wanted if k.console.key not in failed]

    def _await_logins(self, keepers: list[Keeper], node: NodeSpec, *, at_most: float = KEEP_AT_MOST) -> None:
        """Release each keeper once its pool has a logged-in server connection to ``node`` (at most ``at_most`` s)."""
        start = time.monotonic()
        addresses = _addresses(node.address)
        pending = [k for k in keepers if k.released is None]
        while pending:
            members = [self.members[n] for n in sorted({k.bouncer for k in pending})]
            shown = consoles.execute(_consoles(members), "SHOW SERVERS", timeout=max(0.5, at_most))
            there = {(name, r["database"], r["user"]) for name, o in shown.items() if o.ok for r in o.rows
                     if r.get("state") in LOGGED_IN and str(r.get("port")) == str(node.port)
                     and r.get("addr") in addresses}
            done = [k for k in pending if (k.bouncer, k.database, k.user) in there]
            self._release(done, f"a server of its pool logged in to {node.name}", since=start)
            pending = [k for k in pending if k not in done]
            if pending and time.monotonic() - start >= at_most:
                self._release(pending, f"no login to {node.name} within {at_most:g} s", since=start)
                logger.warning("no server logged in to %s within %g s in these pools; released anyway: %s",
                               node.name, at_most, ", ".join(k.pool for k in pending))
                return
            if pending:
                time.sleep(0.01)
            # A console whose SHOW SERVERS failed was closed: open it again for the next round.
            consoles.connect(_consoles(members, unopened=True), timeout=1)

    def _release(self, keepers: list[Keeper], why: str, *, since: float | None = None) -> None:
        """Roll back and close the ``keepers`` not released yet."""
        todo = [k for k in keepers if k.released is None]
        if not todo:
            return
        consoles.execute([k.console for k in todo if k.console.is_open], "ROLLBACK", timeout=2)
        now = time.monotonic()
        for k in todo:
            k.console.close()
            k.released = why
            if since is not None:
                k.held = round(now - since, 3)
            logger.info("keeper of %s released after %.3f s: %s", k.pool, k.held, why)

    # --- reaching ------------------------------------------------------------------------------

    def open(self, *, timeout: float = 10) -> dict[str, str]:
        """Reach every PgBouncer: host, config file, console (``SHOW CONFIG``). Returns {name: why} for failures."""
        _parallel(self.members.values(), self._reach)
        reached = [m for m in self.members.values() if m.error is None and m.console is not None]
        for key, outcome in consoles.connect(_consoles(reached), timeout=timeout).items():
            if not outcome.ok:
                self.members[key].error = f"console: {outcome.error}"
        ready = [m for m in reached if m.error is None]
        for key, outcome in consoles.execute(_consoles(ready), "SHOW CONFIG",
                                             timeout=timeout).items():
            if outcome.ok:
                self.members[key].config = {r["key"]: r["value"] for r in outcome.rows}
            else:
                self.members[key].error = f"console: {outcome.error}"
        ready = [m for m in ready if m.error is None and m.console is not None]
        probed = consoles.execute(_consoles(ready), "SHOW STATE", timeout=timeout)
        for key, outcome in probed.items():
            m = self.members[key]
            m.has_state = outcome.ok
            # An unknown command closed the console: reopen it.
            if not outcome.ok and m.console is not None and not consoles.connect([m.console], timeout=timeout)[key].ok:
                m.error = "console: lost after SHOW STATE"
        return self.errors()

    def errors(self) -> dict[str, str]:
        return {m.name: m.error for m in self.members.values() if m.error is not None}

    def _reach(self, m: Member) -> None:
        try:
            m.text = m.host.read_text(m.spec.config)
            params = dict(psycopg2.extensions.parse_dsn(m.spec.admin))
            host = params.get("host")
            if host is None:
                raise OpsError(f"admin of [pgbouncer {m.name}] has no host=; say where its console listens")
            params["host"], port = m.host.tunnel(host, params.get("port", "6432"))
            params["port"] = str(port)
            params.setdefault("connect_timeout", "5")
            m.console = consoles.Console(m.name, psycopg2.extensions.make_dsn(**params))
        except (OpsError, OSError) as exc:
            where = f" ({m.spec.ssh})" if m.spec.ssh else ""
            m.error = f"{m.host.name}{where}: {exc}"

    def require_all(self) -> None:
        """Refuse (nothing changed) unless every PgBouncer was reached."""
        errors = self.errors()
        if errors:
            raise Refused(
                "refusing: these PgBouncers cannot be reached, and switching only part of the fleet would split "
                "it between two servers; nothing was changed:\n"
                + "\n".join(f"  {name}: {why}" for name, why in errors.items())
                + "\nfix them (or remove them from the inventory) and run the command again"
            )

    # --- observing -----------------------------------------------------------------------------

    def observe(self) -> dict[str, BouncerState]:
        """Each PgBouncer's running targets (``SHOW DATABASES``), its file's targets, paused, settings."""
        ready = [m for m in self.members.values() if m.error is None and m.console is not None]
        shown = consoles.execute(_consoles(ready), "SHOW DATABASES", timeout=5)
        states = consoles.execute(_consoles(m for m in ready if m.has_state and shown[m.name].ok),
                                  "SHOW STATE", timeout=5)
        result = {}
        for name, m in self.members.items():
            outcome = shown.get(name)
            if m.error is not None or outcome is None or not outcome.ok:
                result[name] = BouncerState(name, False, error=m.error or (outcome.error if outcome else "not opened"))
                continue
            result[name] = self._state(m, outcome.rows)
            if name in states and states[name].ok and _globally_paused(states[name].rows):
                result[name].paused = True
        return result

    def _state(self, m: Member, rows: list[dict[str, Any]]) -> BouncerState:
        running = {r["name"]: r for r in rows}
        wanted = m.entries()
        file_dbs = parse_config(m.text or "").get("databases", {})
        entries, on_disk = {}, {}
        for name in wanted:
            p = parse_conninfo(file_dbs[name])
            on_disk[name] = f"{p.get('host', '')}:{p.get('port', '5432')}"
            # The "*" entry never shows in SHOW DATABASES; the databases it made do.
            row = running.get(name)
            if row is not None:
                entries[name] = f"{row['host']}:{row['port']}"
        if not entries:
            entries = {n: f"{r['host']}:{r['port']}" for n, r in running.items() if n != "pgbouncer" and r["host"]}
        if not entries:
            entries = dict(on_disk)
        paused = any(int(running[n]["paused"]) for n in wanted if n in running) or (
            not wanted and any(int(r["paused"]) for r in rows))
        return BouncerState(
            m.name, True, target=self._node_of(entries.values()), file_target=self._node_of(on_disk.values()),
            entries=entries, paused=bool(paused), settings={k: m.config.get(k, "") for k in WATCHED},
        )

    def _node_of(self, addresses: Iterable[str]) -> str | None:
        names = set()
        for address in addresses:
            host, _, port = address.rpartition(":")
            node = self.inventory.node_at(host, port)
            names.add(node.name if node else address)
        if not names:
            return None
        return names.pop() if len(names) == 1 else "mixed: " + ", ".join(sorted(names))

    # --- switching -----------------------------------------------------------------------------

    def plan_repoint(self, node: NodeSpec) -> dict[str, Change]:
        """The new config of every PgBouncer, its chosen entries pointing at ``node``."""
        result = {}
        for name, m in self.members.items():
            assert m.text is not None, f"{name} was not opened"
            result[name] = Change(name, m.text, repoint(m.text, node.target, m.spec.databases))
        return result

    def write(self, changes: dict[str, Change]) -> list[str]:
        """Phase one: write every changed file; on any failure put back those written and refuse.

        Returns the names written. Raises ``Refused`` (all put back: nothing changed) or
        ``PartlyDone`` (a file could not be put back: the output names it).
        """
        todo = [c for c in changes.values() if c.changed]
        failed = dict(_parallel(todo, lambda c: self._write(c.name, c.new)))
        failures = {name: why for name, why in failed.items() if why is not None}
        written = [c.name for c in todo if failed.get(c.name) is None]
        if not failures:
            return written
        restored = dict(_parallel([changes[n] for n in written], lambda c: self._write(c.name, c.old)))
        unrestored = {n: why for n, why in restored.items() if why is not None}
        if unrestored:
            raise PartlyDone(
                "could not write every PgBouncer config, and some files already written could not be put back; "
                "nothing was reloaded (running PgBouncers are unchanged), but fix these files by hand:",
                {**{n: f"write failed: {w}" for n, w in failures.items()},
                 **{n: f"NEW config left on disk (not reloaded): {w}" for n, w in unrestored.items()}},
            )
        raise Refused(
            "could not write every PgBouncer config; the files already written were put back and nothing "
            "was reloaded:\n" + "\n".join(f"  {n}: {w}" for n, w in failures.items())
        )

    def _write(self, name: str, text: str) -> str | None:
        m = self.members[name]
        try:
            m.host.write_text_atomic(m.spec.config, text)
        except (OpsError, OSError) as exc:
            return f"{m.host.name}: {exc}"
        m.text = text
        return None

    def reload(self, *, login_retry: float | None = None, timeout: float = 5,
               keep: NodeSpec | None = None) -> dict[str, consoles.Outcome]:
        """Phase two: ``RELOAD`` every console at once; then, with ``login_retry``, cut PgBouncer's back-off.

        After a crash each pool has a failed login to the dead server and waits
        ``server_login_retry`` (default 15 s) before trying again, whatever its new target.
        So, right after the RELOAD (which would put back the file's value), every console gets
        ``server_login_retry = 0`` until its pools have reached the new server (at most 2 s),
        then ``login_retry`` (or the file's value where that is lower).

        ``keep`` (the node the files now point at): hold a server of each busy pool across the
        RELOAD (``keep_pools``), released once the pool has logged in to ``keep``; the back-off
        stays cut until then (a login closed by the RELOAD would otherwise delay the next one by
        ``login_retry``, the keeper held and the clients waiting all along).
        """
        ready = _consoles(m for m in self.members.values() if m.error is None)
        with self.keep_pools(keep) if keep is not None else contextlib.nullcontext() as kept:
            results = consoles.execute(ready, "RELOAD", timeout=timeout)
            if login_retry is None:
                return results
            reloaded = [m for m in self.members.values() if m.console is not None and results.get(m.name)
                        and results[m.name].ok]
            final = {}
            for m in reloaded:
                current = m.config.get("server_login_retry", "")
                final[m.name] = current if seconds_setting(current) <= login_retry else f"{login_retry:g}"
            first = (lambda: self._await_logins(kept, keep)) if kept and keep is not None else None
            results.update(self._logins_now_then(reloaded, final, settle=2, timeout=timeout, first=first))
        return results

    def lift_login_backoff(self, *, timeout: float = 2) -> dict[str, consoles.Outcome]:
        """After a RESUME: let every pool log in to its server now, then put ``server_login_retry`` back.

        A client that arrives at a paused database makes PgBouncer open a server connection and
        close it at once ("pause mode"); PgBouncer counts that as a failed login, and after the
        RESUME the pool waits ``server_login_retry`` (15 s by default) before trying again. So:
        ``server_login_retry = 0`` until no pool has clients waiting without a server (at most
        ``timeout``), then each console's own value again.
        """
        ready = [m for m in self.members.values() if m.error is None and m.console is not None]
        return self._logins_now_then(ready, {m.name: m.config.get("server_login_retry") or "15" for m in ready},
                                     settle=timeout)

    def _logins_now_then(self, members: list[Member], final: dict[str, str], *, settle: float,
                         timeout: float = 5, first: Callable[[], None] | None = None) -> dict[str, consoles.Outcome]:
        """``server_login_retry = 0`` on ``members`` until their pools reached a server (at most ``settle``
        s; ``first`` runs before that wait), then ``final[name]``; the outcomes that failed."""
        failed = {k: o for k, o in consoles.execute(_consoles(members), "SET server_login_retry = '0'",
                                                    timeout=timeout).items() if not o.ok}
        lowered = [m for m in members if m.name not in failed]
        if first is not None:
            first()
        self._settle(lowered, timeout=settle)
        back = {m.name: f"SET server_login_retry = '{final[m.name]}'" for m in lowered}
        for key, outcome in consoles.execute(_consoles(lowered), back, timeout=timeout).items():
            if outcome.ok:
                self.members[key].config["server_login_retry"] = final[key]
            else:
                failed[key] = outcome
        return failed

    def _settle(self, members: list[Member], *, timeout: float) -> None:
        """Wait until no followed pool has clients waiting without a server connection (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending and time.monotonic() < deadline:
            shown = consoles.execute(_consoles(pending), "SHOW POOLS", timeout=timeout)
            still = []
            for m in pending:
                outcome = shown.get(m.name)
                if outcome is None or not outcome.ok:
                    continue
                follows = set(m.entries())
                starved = [r for r in outcome.rows if r["database"] != "pgbouncer"
                           and ("*" in follows or r["database"] in follows) and int(r["cl_waiting"]) > 0
                           and not sum(int(r[k]) for k in ("sv_active", "sv_idle", "sv_used", "sv_tested"))]
                if starved:
                    still.append(m)
            pending = still
            if pending:
                time.sleep(0.01)

    def verify(self, node: NodeSpec, *, timeout: float = 5) -> dict[str, str]:
        """Wait until every PgBouncer's ``SHOW DATABASES`` points its entries at ``node``; {name: why not}."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.observe()
            wrong = {n: (s.error or f"points at {s.target}") for n, s in states.items()
                     if not s.reachable or s.target != node.name}
            if not wrong or time.monotonic() >= deadline:
                return wrong
            time.sleep(0.05)

    def pause(self, *, timeout: float) -> dict[str, consoles.Outcome]:
        """``PAUSE`` every PgBouncer (its listed databases, or all) at once; each must finish within ``timeout``.

        A PAUSE that times out has its connection closed (see ``console``); the caller must then
        ``resume()`` everything.
        """
        jobs: dict[str, str] = {}
        extra = []
        for m in self.members.values():
            if m.console is None:
                continue
            if m.spec.databases is None:
                jobs[m.name] = "PAUSE"
                continue
            for db in m.spec.databases:
                c = consoles.Console(f"{m.name}/{db}", m.console.dsn)
                extra.append(c)
                jobs[c.key] = f'PAUSE "{db}"'
        try:
            consoles.connect(extra, timeout=timeout)
            chosen = _consoles(m for m in self.members.values() if m.name in jobs) + extra
            results = consoles.execute(chosen, jobs, timeout=timeout)
        finally:  # interrupted too: a PAUSE left pending on an open console would hang after RESUME
            for c in extra:
                c.close()
        merged: dict[str, consoles.Outcome] = {}
        for key, outcome in results.items():
            name = key.split("/", 1)[0]
            if name not in merged or not outcome.ok:
                merged[name] = outcome
        return merged

    def restore(self, changes: dict[str, Change]) -> dict[str, str]:
        """Put every changed file back as it was (each on its own, no rollback); {name: why} for those left new."""
        done = _parallel([c for c in changes.values() if c.changed], lambda c: self._write(c.name, c.old))
        return {name: f"NEW config left on disk (not reloaded): {why}" for name, why in done if why is not None}

    def arm_timers(self, limit: float) -> dict[str, deadman.Timer]:
        """On every PgBouncer's host, a dead-man timer that RESUMEs it after ``limit`` s (``deadman``).

        Raises ``OpsError`` (after disarming those armed) when any cannot be armed.
        """
        def arm(m: Member) -> deadman.Timer | str:
            # As lift_login_backoff(): a pool that failed a login while paused would wait out
            # server_login_retry after the RESUME.
            retry = m.config.get("server_login_retry") or "15"
            try:
                return deadman.arm(m.host, m.name, m.spec.admin,
                                   ["SET server_login_retry = '0'", *_resume_commands(m)], limit,
                                   then=[f"SET server_login_retry = '{retry}'"])
            except OpsError as exc:
                return str(exc)

        armed = dict(_parallel(self.members.values(), arm))
        failed = [why for why in armed.values() if isinstance(why, str)]
        timers = {n: t for n, t in armed.items() if isinstance(t, deadman.Timer)}
        if failed:
            self.disarm_timers(timers)
            raise OpsError("; ".join(failed))
        return timers

    def disarm_timers(self, timers: dict[str, deadman.Timer]) -> dict[str, str]:
        """Stop the timers; {name: what it recorded} for any that had fired already, or could not be stopped."""
        def disarm(t: deadman.Timer) -> str | None:
            try:
                return deadman.disarm(t)
            except OpsError as exc:
                return f"its timer may still fire: {exc}"

        return {n: r for n, r in _parallel(timers.values(), disarm) if r is not None}

    def timer_records(self) -> dict[str, str]:
        """{name: record} for each PgBouncer whose dead-man timer RESUMEd it since the last procedure finished."""
        reached = [m for m in self.members.values() if m.error is None]

        def look(m: Member) -> str | None:
            try:
                return deadman.record(m.host, m.name, m.spec.admin)
            except OpsError:
                return None

        return {n: r for n, r in _parallel(reached, look) if r is not None}

    def resume(self, *, timeout: float = 5) -> dict[str, consoles.Outcome]:
        """``RESUME`` every PgBouncer (each listed database, or all); "not paused" counts as done.

        Consoles closed by a failed PAUSE or command are reopened first, so nothing is left paused
        because of an earlier error.
        """
        members = [m for m in self.members.values() if m.console is not None]
        steps = {m.name: _resume_commands(m) for m in members}
        results: dict[str, consoles.Outcome] = {}
        for i in range(max((len(s) for s in steps.values()), default=0)):
            batch = {n: s[i] for n, s in steps.items() if i < len(s)}
            chosen = [m for m in members if m.name in batch and m.console is not None]
            consoles.connect(_consoles(chosen, unopened=True),
                             timeout=timeout)
            for name, outcome in consoles.execute(_consoles(chosen), batch,
                                                  timeout=timeout).items():
                if not outcome.ok and outcome.error and "not paused" in outcome.error:
                    outcome = consoles.Outcome(True, seconds=outcome.seconds)
                if name not in results or results[name].ok:
                    results[name] = outcome
        # Leave every console open for whatever comes next (a failed command closed its own).
        consoles.connect(_consoles(members, unopened=True),
                         timeout=timeout)
        return results


def _resume_commands(m: Member) -> list[str]:
    """What undoes ``pause()`` on ``m``: RESUME each listed database, or the whole PgBouncer."""
    return [f'RESUME "{db}"' for db in m.spec.databases] if m.spec.databases else ["RESUME"]


def _consoles(members: Iterable[Member], *, unopened: bool = False) -> list[consoles.Console]:
    """The consoles of ``members`` that have one (with ``unopened``: only those not open now)."""
    return [m.console for m in members if m.console is not None and not (unopened and m.console.is_open)]


def _keeper_dsn(console_dsn: str, database: str, user: str, timeout: float) -> str:
    """A client DSN for pool ``database``/``user``, through the console's host and port (tunnel included).

    The console's password goes along only when the pool's user is the console's; for another user
    libpq looks up its usual sources (``~/.pgpass``, ``PGPASSFILE``, ``PGPASSWORD``)."""
    params = dict(psycopg2.extensions.parse_dsn(console_dsn))
    if params.get("user") != user:
        params.pop("password", None)
    params.update(dbname=database, user=user, connect_timeout=str(max(1, round(timeout))),
                  application_name="srht-readonly-keeper")
    return psycopg2.extensions.make_dsn(**params)


def _addresses(host: str) -> set[str]:
    """What SHOW SERVERS may show as ``addr`` for a server at ``host``: itself and what it resolves to."""
    found = {host}
    with contextlib.suppress(OSError):
        found.update(str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    return found


def _globally_paused(rows: list[dict[str, Any]]) -> bool:
    """From SHOW STATE's rows: is the whole PgBouncer paused (or suspended)?"""
    for row in rows:
        values = [str(v).lower() for v in row.values()]
        if values and values[0] in ("paused", "suspended") and values[-1] in ("yes", "true", "1", "on"):
            return True
    return False


def seconds_setting(value: str | None) -> float:
    """A PgBouncer duration setting (``15``, ``15.0``, ``15s``) in seconds; unknown counts as high."""
    if not value:
        return float("inf")
    text = value.strip().rstrip("s")
    try:
        return float(text)
    except ValueError:
        return float("inf")


def _parallel(items: Iterable[T], fn: Callable[[T], Any]) -> list[tuple[Any, Any]]:
    """Run ``fn`` on every item in threads; returns (item.name or item, result) pairs in order."""
    items = list(items)
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        results = list(pool.map(fn, items))
    return [(getattr(i, "name", i), r) for i, r in zip(items, results, strict=True)]

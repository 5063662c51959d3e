"""The fleet's desired state in etcd: what the procedures decided, what the agents converge to.

With an inventory ``[etcd]`` section, ``PREFIX/state`` holds one JSON document::

    {"generation": 7, "primary": "konpaku", "timeline": 2,
     "pgbouncers": {"git.sr.ht": "konpaku", "meta.sr.ht": "konpaku"},
     "by": "failover --to konpaku (alice@bastion)", "time": 1764600000.0}

``failover``, ``switchover``, ``promote`` and an agent's automatic promotion each write the next
generation in one etcd transaction (``publish``: compare the document read, put the new one; a
writer that got in between makes it fail, and nothing is written). ``primary`` is the node that
takes writes (None when none answered as one), ``pgbouncers`` where each PgBouncer should point.

Each agent (``ops.agent``) reads the document four times a second (``Follower``). A generation
it has not seen that points its PgBouncer elsewhere, it carries out on its own PgBouncer, as its
own failover does: so ``failover`` moves the whole fleet in parallel, each config written and
reloaded on its own host by its agent (the command still reaches every console first, for its
checks). The agent's heartbeat (``ops.etcd.Heartbeat``) then says
which generation it follows, and ``failover`` waits for that (``wait_converged``); a PgBouncer
whose agent does not beat, is frozen, or does not answer in time, the command repoints itself.

``PauseFlag``: ``PREFIX/paused`` while a switchover holds every PgBouncer paused (on a lease of
its dead-man limit), which ``status`` shows.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import PartlyDone, Refused
from .etcd import agents, client, why
from .inventory import EtcdSpec
from .lock import _user

logger = logging.getLogger(__name__)

__all__ = ["FleetState", "Follower", "PauseFlag", "live_agents", "paused", "publish", "read", "wait_converged"]

#: Seconds between two reads of the state by an agent (one small range read each).
FOLLOW_INTERVAL = 0.25
#: A heartbeat younger than this counts as an agent that will converge (agents beat every second).
LIVE_AGE = 2.5


@dataclasses.dataclass(frozen=True)
class FleetState:
    """One generation of the fleet's desired state (see the module's docstring)."""

    generation: int
    primary: str | None
    timeline: int | None
    pgbouncers: dict[str, str]
    by: str
    time: float

    @classmethod
    def parse(cls, raw: str | bytes) -> FleetState | None:
        """The document as etcd holds it; None for one this version cannot read."""
        try:
            data = json.loads(raw)
            return cls(int(data["generation"]), data.get("primary"), data.get("timeline"),
                       {str(k): str(v) for k, v in (data.get("pgbouncers") or {}).items()},
                       str(data.get("by", "?")), float(data.get("time", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _key(spec: EtcdSpec) -> str:
    return f"{spec.prefix}/state"


def read(spec: EtcdSpec, *, etcd: Any = None) -> tuple[FleetState | None, str | None]:
    """The state and the document as read (None, None: no state yet); ``Refused`` when etcd cannot be read."""
    from etcd3gw import exceptions

    etcd = etcd or client(spec)
    try:
        values = etcd.get(_key(spec))
    except (exceptions.Etcd3Exception, OSError) as exc:
        raise Refused(f"cannot read the fleet's state from etcd: {why(exc)}") from exc
    if not values:
        return None, None
    raw = values[0].decode() if isinstance(values[0], bytes) else str(values[0])
    return FleetState.parse(raw), raw


def publish(spec: EtcdSpec, command: str, *, primary: str | None, timeline: int | None,
            pgbouncers: dict[str, str] | None = None) -> FleetState:
    """Write the next generation in one transaction; ``pgbouncers`` None keeps the current targets.
    ``Refused`` (nothing written) when etcd cannot be reached or another writer got in between."""
    from etcd3gw import exceptions

    etcd = client(spec)
    current, raw = read(spec, etcd=etcd)
    state = FleetState((current.generation if current else 0) + 1, primary, timeline,
                       dict(pgbouncers if pgbouncers is not None else (current.pgbouncers if current else {})),
                       f"{command} ({_user()}@{socket.gethostname()}, pid {os.getpid()})", time.time())
    value = json.dumps(dataclasses.asdict(state), sort_keys=True)
    try:
        done = etcd.create(_key(spec), value) if raw is None else etcd.replace(_key(spec), raw, value)
    except (exceptions.Etcd3Exception, OSError) as exc:  # a timeout may hide a write that went through
        try:
            now = read(spec)[1]
        except Refused as unknown:
            raise PartlyDone(f"etcd did not answer the write of the fleet's state ({why(exc)}), nor the read that "
                             f"would tell whether it went through ({unknown}): the agents may carry it out or not; "
                             f"check `srht-readonly status` and run the command again",
                             {"etcd": "unknown"}) from exc
        if now != value:
            raise Refused(f"could not write the fleet's state to etcd: {why(exc)}") from exc
    if not done:
        raise Refused("the fleet's state in etcd changed while this command wrote it (another writer); nothing "
                      "was written: check `srht-readonly status` and run the command again")
    logger.info("fleet state generation %d: %s", state.generation, value)
    return state


def live_agents(spec: EtcdSpec) -> dict[str, dict[str, Any]]:
    """The agents that will converge: a heartbeat under ``LIVE_AGE`` s old, neither frozen nor waiting."""
    return {name: beat for name, beat in agents(spec).items()
            if beat.get("age", LIVE_AGE) < LIVE_AGE and beat.get("state") not in ("waiting", None)
            and not beat.get("frozen")}


def wait_converged(spec: EtcdSpec, state: FleetState, names: list[str], *, timeout: float) -> dict[str, float]:
    """{name: seconds} for each of ``names`` whose agent's heartbeat reported ``state``'s generation (or a later
    one) with its PgBouncer where ``state`` says, within ``timeout`` s."""
    started = time.monotonic()
    done: dict[str, float] = {}
    etcd = None  # one client for every poll, made again after a failure
    while True:
        try:
            etcd = etcd or client(spec)
            beats = agents(spec, etcd=etcd)
        except Refused as exc:
            logger.warning("%s", exc)
            etcd, beats = None, {}
        for name in names:
            beat = beats.get(name, {})
            if (name not in done and int(beat.get("generation") or 0) >= state.generation
                    and beat.get("points_at") == state.pgbouncers.get(name)):
                done[name] = round(time.monotonic() - started, 3)
        if len(done) == len(names) or time.monotonic() - started >= timeout:
            return done
        time.sleep(0.05)


class Follower:
    """Reads ``PREFIX/state`` every ``FOLLOW_INTERVAL`` s in a thread of its own; ``latest()`` is the last
    state read (an agent never waits for etcd in its own loop); ``on_change`` is called when a new
    generation is read (the agent steps at once)."""

    def __init__(self, spec: EtcdSpec, *, interval: float = FOLLOW_INTERVAL,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.spec, self.interval, self.on_change = spec, interval, on_change
        self._latest: FleetState | None = None
        self._read = threading.Event()  # set once a read went through
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="srht-readonly-follower", daemon=True)
        self._failing: str | None = None

    def start(self) -> Follower:
        self._thread.start()
        return self

    def latest(self) -> FleetState | None:
        return self._latest

    def wait_read(self, timeout: float) -> bool:
        """Whether a read went through within ``timeout`` s (the state then is ``latest()``, maybe None)."""
        return self._read.wait(timeout)

    def _run(self) -> None:
        etcd = None
        while not self._stop.is_set():
            try:
                etcd = etcd or client(self.spec, timeout=2.0)
                state, _ = read(self.spec, etcd=etcd)
                newer = state is not None and (self._latest is None or state.generation > self._latest.generation)
                if state is not None:
                    self._latest = state
                self._read.set()
                if newer:
                    self.on_change()
                self._failing = None
            except Exception as exc:  # noqa: BLE001 - Refused, or anything else: the thread must go on reading
                etcd = None
                if str(exc) != self._failing:
                    self._failing = str(exc)
                    logger.warning("reading the fleet's state from etcd failed (retrying): %s", exc)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class PauseFlag:
    """``PREFIX/paused`` while a procedure holds the fleet's PgBouncers paused: who, since when, and the
    dead-man limit. The key lives on a lease of that limit, so a procedure that dies takes it away when
    its dead-man timers RESUME the PgBouncers. Best effort both ways: the pause itself never waits on it
    (the fleet lock already made sure etcd answered)."""

    def __init__(self, spec: EtcdSpec, command: str, limit: float) -> None:
        self.spec, self.command, self.limit = spec, command, limit
        self._lease: Any = None

    def raise_(self) -> bool:
        """Whether the flag is up now."""
        try:
            etcd = client(self.spec)
            lease = etcd.lease(max(1, round(self.limit)))
            etcd.put(f"{self.spec.prefix}/paused", json.dumps(
                {"by": f"{self.command} ({_user()}@{socket.gethostname()}, pid {os.getpid()})", "since": time.time(),
                 "limit": self.limit}), lease=lease)
            self._lease = lease
            return True
        except Exception as exc:  # noqa: BLE001 - the pause goes on without its flag
            logger.warning("could not raise the pause flag in etcd: %s", why(exc))
            return False

    def lower(self) -> None:
        if self._lease is None:
            return
        try:
            self._lease.revoke()
        except Exception as exc:  # noqa: BLE001 - it expires with its lease
            logger.warning("could not lower the pause flag in etcd (it expires within %g s): %s", self.limit, why(exc))
        self._lease = None


def paused(spec: EtcdSpec) -> dict[str, Any] | None:
    """The pause flag (``by``, ``since``, ``limit``), or None; ``Refused`` when etcd cannot be read."""
    from etcd3gw import exceptions

    try:
        values = client(spec).get(f"{spec.prefix}/paused")
    except (exceptions.Etcd3Exception, OSError) as exc:
        raise Refused(f"cannot read the pause flag from etcd: {why(exc)}") from exc
    if not values:
        return None
    try:
        flag = json.loads(values[0])
    except ValueError:
        return None
    return flag if isinstance(flag, dict) else None

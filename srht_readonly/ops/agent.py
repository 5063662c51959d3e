"""``srht-readonly agent``: beside one PgBouncer, a read-only failover without an operator.

The plan asks whether reads can be directed to the standby transparently when the primary
fails. A read-only failover needs no consensus: a standby cannot diverge, so pointing one
PgBouncer at it can never split the data. Only a promotion can, and **by default the agent
never promotes** (``--auto-promote`` adds it, with consensus and fencing: ``ops.autopromote``).
Each agent acts on its own PgBouncer only, so one agent per PgBouncer host gives every
PgBouncer its own, independent decision.

Every ``interval`` seconds each node the agent watches is probed (``Prober``: a thread per node,
a connection of its own kept open, with a bounded connect timeout and TCP keepalives and user
timeout, so a node that stops answering, a killed one or one behind a black hole, is seen
within a second), and the PgBouncer's console is looked at. ``decide`` turns what was seen into
one of:

* ``away``: the primary the agent expects has not answered for ``confirm`` seconds (and at
  least ``MIN_FAILURES`` probes in a row failed), and the standby answers, is in recovery, and
  was streaming when the primary was last seen: the PgBouncer is pointed at the standby, as
  ``failover`` does for one PgBouncer (``server_login_retry`` held at 0 until its pools reach
  the standby, the dead node's server connections dropped by the RELOAD). Services then serve
  reads and refuse writes with the explanation, as in a planned read-only window;
* ``back``: while away, the primary answers again *as a primary on the timeline it had* (it was
  not replaced) for ``confirm`` seconds, and the standby is still a standby: pointed back;
* ``adopt``: while away, the standby answers as a primary (an operator ran ``promote``): it is
  the primary now, and the agent expects it from then on (it stays pointed at it);
* ``follow``: not away, the primary gone, and the standby answers as a primary on a later timeline
  (promoted while this PgBouncer stayed on the old primary: it was paused, frozen, or had just
  come back): pointed at it, and expected from then on;
* ``hands-off``: the PgBouncer is paused, or points at a node the agent did not point it at
  (an operator's ``switchover`` or ``failover`` under way or done): the agent changes nothing
  until the PgBouncer is resumed and points at a primary, which it then expects.

With an inventory ``[etcd]`` section the agent beats (``etcd.Heartbeat``) every second, and when
etcd has taken none for ``FREEZE_AFTER`` seconds (its quorum lost, or etcd unreachable from this
host) the agent **freezes**: it changes nothing, whatever its probes see, until etcd takes its
heartbeats again. The fleet's state is kept in etcd; an agent cut off from it may be the one cut
off from everything, and a fleet that lost its consensus store is one for an operator.

Two switches are at least ``dwell`` seconds apart (a primary that flaps cannot make the
PgBouncer flap), and the agent only ever points at the two nodes it watches: the primary its
PgBouncer pointed at when it started (or that an operator pointed it at since), and that
primary's standby. Every decision is logged (stderr) and sent to the inventory's event hook
(``[hooks]``, event ``agent``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from .autopromote import AutoPromoter, Candidate
from .cluster import Cluster
from .desired import FleetState, Follower
from .errors import OpsError
from .etcd import Heartbeat
from .failover import LOGIN_RETRY, FailoverPlan, run_failover
from .fleet import BouncerState, Fleet, seconds_setting
from .hooks import Hooks
from .inventory import NodeSpec

logger = logging.getLogger(__name__)

__all__ = ["Agent", "Look", "Prober", "Seen", "decide"]

#: Defaults: seconds between probes, seconds a primary must be unreachable (or back) before the
#: agent acts, seconds between two switches, and the probes' timeout.
INTERVAL = 0.2
CONFIRM = 1.0
DWELL = 10.0
PROBE_TIMEOUT = 1.0
#: Failed probes in a row, at least, before a primary is taken as gone (with ``CONFIRM``).
MIN_FAILURES = 3
#: Seconds before a repoint for the fleet's desired state (``ops.desired``) that failed is tried again.
CONVERGE_RETRY = 2.0
#: With ``[etcd]``: seconds without etcd taking a heartbeat (a put needs the quorum) after which the agent
#: freezes. An agent beats every second, and losing one member of three costs one beat at most.
FREEZE_AFTER = 3.0
#: A probe's answer counts as "now" for this long (or ``confirm``, if longer), and one under way that
#: long is stuck: several probe intervals, so a short ``--confirm`` never takes a probe in flight for a
#: dead node, nor a standby answering at its normal pace for a silent one.
FRESH = 1.0

PROBE_SQL = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_insert_lsn()) END,
       (SELECT status FROM pg_stat_wal_receiver),
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_insert_lsn() END
        - '0/0'::pg_lsn)::bigint
"""


@dataclass(frozen=True)
class Look:
    """One probe of a node: ``role`` ``primary``/``standby``, or None when it did not answer (``error``);
    ``lsn``: the WAL a primary has written, or a standby received (bytes), when known."""

    at: float
    role: str | None
    timeline: int | None = None
    streaming: bool = False
    error: str | None = None
    lsn: int | None = None


class Prober:
    """Probes ``spec`` every ``interval`` seconds in a thread of its own; ``seen()`` is what it knows."""

    def __init__(self, spec: NodeSpec, *, interval: float = INTERVAL, timeout: float = PROBE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.interval, self.timeout, self.clock = spec, interval, timeout, clock
        self._lock = threading.Lock()
        self._seen = Seen()
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"agent-probe-{spec.name}", daemon=True)

    def start(self) -> Prober:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)
        if not self._thread.is_alive():  # else a probe still blocked on it: the daemon thread keeps it
            self.close()

    def seen(self) -> Seen:
        with self._lock:
            return self._seen

    def _run(self) -> None:
        while not self._stop.is_set():
            look = self.look()
            with self._lock:
                self._seen = self._seen.add(look)
            self._stop.wait(self.interval)

    def look(self) -> Look:
        """One probe (reconnecting when the last one failed)."""
        started = self.clock()
        try:
            if self._conn is None or self._conn.closed:
                ms = int(self.timeout * 1000)
                # connect_timeout rounds up to whole seconds (libpq: at least 2); tcp_user_timeout bounds
                # a query sent into a black hole; the keepalives a connection that went quiet.
                self._conn = psycopg2.connect(self.spec.dsn, connect_timeout=max(2, round(self.timeout)),
                                              application_name="srht-readonly agent", keepalives=1,
                                              keepalives_idle=1, keepalives_interval=1, keepalives_count=2,
                                              tcp_user_timeout=ms, options=f"-c statement_timeout={ms}")
                self._conn.autocommit = True
            with self._conn.cursor() as cur:
                cur.execute(PROBE_SQL)
                in_recovery, walfile, receiver, lsn = cur.fetchone()
        except Exception as exc:  # noqa: BLE001 - whatever failed, the node did not answer as it should
            self.close()
            return Look(started, None, error=str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
        if in_recovery:
            return Look(started, "standby", streaming=receiver == "streaming", lsn=lsn)
        return Look(started, "primary", timeline=int(walfile[:8], 16), lsn=lsn)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
            self._conn = None


@dataclass(frozen=True)
class Seen:
    """What the probes of one node said: the last look, the last good one, failures in a row, when it
    last answered as a streaming standby, and since when it has answered as it does now."""

    last: Look | None = None
    last_ok: Look | None = None
    failures: int = 0
    streamed_at: float | None = None
    same_since: float | None = None

    def add(self, look: Look) -> Seen:
        same = self.last is not None and (self.last.role, self.last.timeline) == (look.role, look.timeline)
        return Seen(look, look if look.role else self.last_ok, 0 if look.role else self.failures + 1,
                    look.at if look.streaming else self.streamed_at,
                    self.same_since if same and self.same_since is not None else look.at)


@dataclass
class Expected:
    """What the agent expects: the primary, its timeline, the standby, and whether the PgBouncer is on the
    standby because of the agent (``away``)."""

    primary: str
    timeline: int | None
    standby: str
    away: bool = False
    hands_off: str | None = None  # why the agent is leaving the PgBouncer alone, or None
    switched_at: float | None = None
    switched_why: str | None = None  # why the agent made the last switch
    retry_at: float = 0.0  # hands off: when to look again whether the PgBouncer is on a primary


@dataclass(frozen=True)
class Decision:
    action: str  # "stay", "away", "back", "adopt", "follow", "hands-off", "resume", "relearn", "converge"
    why: str
    quiet: bool = False  # a "stay" of the normal course (the primary answers): not logged


def decide(expected: Expected, primary: Seen, standby: Seen, bouncer: BouncerState, now: float, *,
           confirm: float = CONFIRM, dwell: float = DWELL, min_failures: int = MIN_FAILURES) -> Decision:
    """What to do now, from what was seen (pure: ``Agent.step`` carries it out)."""
    home = expected.standby if expected.away else expected.primary
    if not bouncer.reachable:
        return Decision("stay", f"the PgBouncer does not answer: {bouncer.error}")
    if bouncer.paused or bouncer.target not in (home,):
        why = ("the PgBouncer is paused (a procedure under way?)" if bouncer.paused else
               f"the PgBouncer points at {bouncer.target or 'an unknown node'}, not {home}: an operator moved it")
        if expected.hands_off and not bouncer.paused and bouncer.target is not None:
            return Decision("relearn", why)  # Agent.step checks the new target is a primary before resuming
        if expected.hands_off == why:
            return Decision("stay", why, quiet=True)
        return Decision("hands-off", why)
    if expected.hands_off:  # back as the agent left it: carry on with what it expected
        return Decision("resume", f"the PgBouncer points at {home} again and is not paused")
    settled = expected.switched_at is None or now - expected.switched_at >= dwell
    fresh = max(confirm, FRESH)
    s = standby.last if standby.last is not None and now - standby.last.at <= fresh else None  # fresh only
    if not expected.away:
        last_ok = primary.last_ok.at if primary.last_ok else float("-inf")
        # Gone: nothing good for ``confirm`` s, and either probes failing or one stuck (no answer at all).
        stuck = primary.last is not None and now - primary.last.at >= fresh
        if not (now - last_ok >= confirm and (primary.failures >= min_failures or stuck)):
            if s is not None and s.role == "primary":
                return Decision("stay", f"both {expected.primary} and {expected.standby} answer as primaries "
                                        "(a split brain?): the agent changes nothing")
            return Decision("stay", "the primary answers", quiet=True)
        if s is not None and s.role == "primary" and (s.timeline or 0) > (expected.timeline or 0):
            return Decision("follow", f"{expected.primary} is gone and {expected.standby} answers as a primary on "
                                      f"timeline {s.timeline} (promoted while this PgBouncer stayed on the old one)")
        if s is None or s.role != "standby":
            return Decision("stay", f"the primary is gone but the standby {expected.standby} "
                                    f"{'does not answer' if s is None or s.role is None else 'is not a standby'}: "
                                    "nowhere safe to point at")
        # Streaming around the primary's last answer: within ``fresh`` of it (a probe of each node every
        # interval, but on a loaded machine one may lag the other by more than a short ``confirm``).
        if standby.streamed_at is None or (primary.last_ok is not None and standby.streamed_at < last_ok - fresh):
            return Decision("stay", f"the primary is gone but {expected.standby} was not streaming from it: "
                                    "it may lack recent writes, and reads would go back in time")
        if not settled:
            return Decision("stay", f"the primary is gone, but the last switch was under {dwell:g} s ago")
        failed = primary.last.error if primary.last and primary.last.error else "no answer"
        return Decision("away", f"{expected.primary} has not answered for {confirm:g} s "
                                f"({primary.failures} probes failed: {failed}); {expected.standby} streamed from it")
    if standby.last is not None and standby.last.role == "primary":
        return Decision("adopt", f"{expected.standby} answers as a primary (promoted)")
    p = primary.last if primary.last is not None and now - primary.last.at <= fresh else None
    back = (p is not None and p.role == "primary" and p.timeline == expected.timeline
            and primary.same_since is not None and now - primary.same_since >= confirm)
    if not back or p is None:
        return Decision("stay", "away: the primary has not come back as it was", quiet=True)
    if s is None or s.role != "standby":
        return Decision("stay", f"{expected.primary} is back, but {expected.standby} is not seen as a standby now: "
                                "it may have been promoted; pointing back could split writes")
    if not settled:
        return Decision("stay", f"{expected.primary} is back, but the last switch was under {dwell:g} s ago")
    return Decision("back", f"{expected.primary} answers again as the primary on timeline {p.timeline} "
                            f"for {confirm:g} s, and {expected.standby} is still a standby")


@dataclass
class Agent:
    """The loop of one agent: probers for the two nodes, the PgBouncer's console, ``decide``, the repoint."""

    cluster: Cluster
    pgbouncer: str
    interval: float = INTERVAL
    confirm: float = CONFIRM
    dwell: float = DWELL
    timeout: float = PROBE_TIMEOUT
    say: Callable[[str], None] = logger.warning
    auto_promote: float | None = None  # --auto-promote AFTER (ops.autopromote), or None: never promotes
    expected: Expected | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pgbouncer not in self.cluster.inventory.pgbouncers:
            raise OpsError(f"no [pgbouncer {self.pgbouncer}] in {self.cluster.inventory.path}; known: "
                           f"{', '.join(self.cluster.inventory.pgbouncers) or 'none'}")
        self.fleet = Fleet(self.cluster, [self.pgbouncer])
        self.hooks = Hooks(self.cluster.inventory.hooks.command, command_name=f"agent --pgbouncer {self.pgbouncer}",
                           inventory=str(self.cluster.inventory.path))
        self.probers: dict[str, Prober] = {}
        self._stayed: str | None = None  # the last reason to stay that was logged
        etcd = self.cluster.inventory.etcd
        self.heartbeat = Heartbeat(etcd, self.pgbouncer) if etcd is not None else None
        self._wake = threading.Event()  # set by the follower on a new generation: step now, not after interval
        self.follower = Follower(etcd, on_change=self._wake.set) if etcd is not None else None  # ops.desired
        # The desired state's generation the agent follows: the one it found at its start (0: none), or when
        # etcd first answered if it did not then; only a later one is carried out, never one written before.
        self.generation: int | None = None if etcd is not None else 0
        self._converge_retry_at = 0.0  # after a repoint for the fleet's state failed: when to try again
        self._deferred: int | None = None  # the generation last deferred (its reason logged once)
        self._next_beat = 0.0
        self._target: str | None = None  # where the PgBouncer pointed at the last look
        self.frozen: str | None = None  # why the agent changes nothing now (etcd takes no heartbeat), or None
        self.promoter: AutoPromoter | None = None
        if self.auto_promote is not None:
            self.promoter = AutoPromoter(self.cluster, self.pgbouncer, self.auto_promote, self._record)

    def run(self, stop: threading.Event) -> None:
        """Until ``stop`` is set: learn what to expect, then probe and decide every ``interval``."""
        try:
            if self.follower is not None and self.follower.start().wait_read(2.0):
                baseline = self.follower.latest()
                self.generation = baseline.generation if baseline is not None else 0
            waiting = None
            while not stop.is_set() and self.expected is None:
                try:
                    self.expected = self.learn()
                except OpsError as exc:  # e.g. restarted while its PgBouncer was away: an operator decides
                    if str(exc) != waiting:
                        waiting = str(exc)
                        self._record("waiting", waiting)
                    self._beat({"state": "waiting", "why": waiting}, force=True)
                    stop.wait(max(1.0, self.interval))
            while not stop.is_set():
                try:
                    d = self.step()
                    self._beat(self._state(d), force=d.action != "stay")
                except Exception as exc:  # noqa: BLE001 - one step failed (a query, ssh...): the agent carries on
                    logger.exception("agent step failed")
                    if self.promoter is not None:
                        self.promoter.want(False)
                    self._record("error", f"this step failed and is tried again: {exc!r}")
                    stop.wait(1.0)
                self._wake.wait(self.interval)
                self._wake.clear()
        finally:
            if self.follower is not None:
                self.follower.stop()
            if self.promoter is not None:
                self.promoter.close()
            for prober in self.probers.values():
                prober.stop()
            self.fleet.close()
            self.hooks.close()
            if self.heartbeat is not None:
                self.heartbeat.close()

    def _beat(self, state: dict[str, Any], *, force: bool = False) -> None:
        """The heartbeat in etcd (``[etcd]``): every second, and at once after each decision."""
        if self.heartbeat is None or (not force and time.monotonic() < self._next_beat):
            return
        self._next_beat = time.monotonic() + 1.0
        self.heartbeat.beat({"pgbouncer": self.pgbouncer, "host": socket.gethostname(), "pid": os.getpid(),
                             **state})

    def _state(self, d: Decision) -> dict[str, Any]:
        """What the heartbeat says: the agent's state, where the PgBouncer points, what the probes see."""
        e = self.expected
        assert e is not None

        def seen(node: str) -> str:
            last = self.probers[node].seen().last
            return "not probed yet" if last is None else last.role or f"down: {last.error}"
        # Seconds since the primary last answered, when its last probe failed or has hung for FRESH s (a
        # black hole); None while it answers, or if it never did. ``ops.autopromote.votes`` counts these.
        primary, now = self.probers[e.primary].seen(), time.monotonic()
        answering = primary.last is not None and primary.last.role == "primary" and now - primary.last.at < FRESH
        silent = None if answering or primary.last_ok is None else round(now - primary.last_ok.at, 2)
        return {"state": "hands-off" if e.hands_off else "away" if e.away else "home", "points_at": self._target,
                "primary": e.primary, "timeline": e.timeline, "standby": e.standby,
                "sees": {e.primary: seen(e.primary), e.standby: seen(e.standby)},
                "primary_silent_for": silent,
                "primary_lsn": primary.last_ok.lsn if primary.last_ok is not None else None,
                "generation": self.generation,
                "why": e.hands_off or self.frozen or (e.switched_why if e.away and d.quiet else d.why)}

    def learn(self, target: str | None = None) -> Expected:
        """Expect the primary the PgBouncer points at (it must answer as one) and that primary's standby.

        The PgBouncer's config is read again first (an operator may have changed it since)."""
        self._reopen()
        bouncer = self._bouncer()
        target = target or bouncer.target
        if target is None:
            raise OpsError(f"{self.pgbouncer} points at no node of the inventory")
        once = Prober(self.cluster.node(target), timeout=self.timeout)
        try:
            look = once.look()
        finally:
            once.close()
        if look.role != "primary":
            raise OpsError(f"{self.pgbouncer} points at {target}, which is not a primary "
                           f"({look.error or look.role}): the agent starts only beside a PgBouncer on the primary")
        standbys = [n for n in self.cluster.inventory.nodes if n != target]
        if len(standbys) != 1:
            raise OpsError(f"the agent watches one primary and one standby; the inventory has {len(standbys) + 1} "
                           "nodes")
        expected = Expected(target, look.timeline, standbys[0])
        for prober in self.probers.values():
            prober.stop()
        self.probers = {n: Prober(self.cluster.node(n), interval=self.interval, timeout=self.timeout).start()
                        for n in (expected.primary, expected.standby)}
        self._record("expect", f"{self.pgbouncer} on {target} (primary, timeline {look.timeline}); "
                               f"standby {expected.standby}")
        return expected

    def step(self) -> Decision:
        """Look once, decide, act."""
        assert self.expected is not None
        e = self.expected
        bouncer = self._bouncer()
        self._target = bouncer.target
        frozen = self._freeze()
        if frozen is not None:
            if self.promoter is not None:
                self.promoter.want(False)
            return Decision("stay", frozen, quiet=True)
        if self.follower is not None and self.generation is None:
            if self.follower.wait_read(0):  # the baseline, not carried out
                baseline = self.follower.latest()
                self.generation = baseline.generation if baseline is not None else 0
        elif self.follower is not None and self.generation is not None:
            latest = self.follower.latest()
            if (latest is not None and latest.generation > self.generation and not bouncer.paused
                    and time.monotonic() >= self._converge_retry_at):  # paused: a procedure under way, later
                if self.promoter is not None:
                    self.promoter.want(False)
                return self._converge(latest, bouncer.target)
        d = decide(e, self.probers[e.primary].seen(), self.probers[e.standby].seen(), bouncer, time.monotonic(),
                   confirm=self.confirm, dwell=self.dwell)
        if d.action != "stay" or d.quiet:
            self._stayed = None
        promoting = d.action == "stay" and d.quiet and e.away and not e.hands_off and self.promoter is not None
        if self.promoter is not None and not promoting:  # the lease only for an agent that could use it now
            self.promoter.want(False)
        if d.action in ("away", "back", "follow") and time.monotonic() < e.retry_at:
            pass  # the last repoint failed: try again a little later
        elif d.action == "away":
            self._repoint(e.standby, d.why, back=False)
        elif d.action == "back":
            self._repoint(e.primary, d.why, back=True)
        elif d.action == "follow":
            self._repoint(e.standby, d.why, back=False, action="follow")
            if self._target == e.standby:
                self._adopt(e)
        elif d.action == "adopt":
            self._record("adopt", d.why)
            try:
                self.expected = self.learn(e.standby)
            except OpsError as exc:
                e.hands_off = str(exc)
                self._record("hands-off", str(exc))
        elif d.action == "hands-off":
            e.hands_off = d.why
            self._record("hands-off", d.why)
        elif d.action == "stay" and not d.quiet and d.why != self._stayed:
            self._record("stay", d.why)  # a refusal to act, once per reason
            self._stayed = d.why
        elif d.action == "resume":
            e.hands_off = None
            self._record("resume", d.why)
        elif promoting:
            self._consider_promotion(e)
        elif d.action == "relearn" and time.monotonic() >= e.retry_at:
            try:
                self.expected = self.learn()
                self._record("resume", d.why)
            except OpsError as exc:  # still not on a primary: stay hands off, look again in a second
                e.retry_at = time.monotonic() + 1.0
                if e.hands_off != str(exc):
                    e.hands_off = str(exc)
                    self._record("hands-off", str(exc))
        return d

    def _converge(self, state: FleetState, target: str | None) -> Decision:
        """A new generation of the fleet's desired state: point the PgBouncer where it says, then expect
        that node as the primary, or, where it is a standby (an operator's read-only window), keep hands
        off until the PgBouncer points at a primary.

        Never towards a node that does not answer (tried again ``CONVERGE_RETRY`` s later, as a repoint
        that failed), nor a primary the state does not name (or on an older timeline than it says), nor
        a standby the state names as the primary (a stale state): those generations are left, said once,
        and the agent goes on deciding alone. A generation counts as followed once carried out or left.
        """
        assert self.expected is not None
        to = state.pgbouncers.get(self.pgbouncer)
        origin = f"the fleet's state, generation {state.generation}, by {state.by}"
        if to is None or to not in self.cluster.inventory.nodes:
            self.generation = state.generation
            why = f"{origin}, names {'no node' if to is None else 'unknown node ' + to} for {self.pgbouncer}"
            self._record("converge", f"{why}: nothing to do")
            return Decision("converge", why)
        once = Prober(self.cluster.node(to), timeout=self.timeout)
        try:
            look = once.look()
        finally:
            once.close()
        if look.role is None:
            return self._later(state, f"{origin}, points {self.pgbouncer} at {to}, which does not answer "
                                      f"({look.error})")
        unsafe = (f"{to} answers as a primary, but the state names {state.primary or 'no primary'}"
                  if look.role == "primary" and to != state.primary else
                  f"{to} is on timeline {look.timeline}, older than the state's {state.timeline}"
                  if look.role == "primary" and state.timeline is not None and (look.timeline or 0) < state.timeline
                  else f"{to} is a standby, but the state names it the primary (a stale state)"
                  if look.role != "primary" and to == state.primary else None)
        if unsafe is not None:
            self.generation = state.generation
            self._record("stay", f"{origin}, points {self.pgbouncer} at {to}, but {unsafe}: left, the agent goes on "
                                 "deciding alone")
            return Decision("converge", unsafe)
        if target != to and not self._point(to, look.role == "primary"):
            return self._later(state, f"{origin}: pointing {self.pgbouncer} at {to} failed")
        why = f"{self.pgbouncer} -> {to}: {origin}" if target != to else f"{self.pgbouncer} already on {to}: {origin}"
        e = self.expected
        if look.role == "primary" and target == to and (e.primary, e.away, e.hands_off) == (to, False, None):
            self.generation = state.generation  # already what the agent expects: its probes go on as they were
            self._record("converge", f"{why} (already expected)")
            return Decision("converge", why)
        if look.role == "primary":
            try:
                expected = self.learn(to)
            except OpsError as exc:
                return self._later(state, f"{origin}: {exc}")
            self.generation, self.expected = state.generation, expected
            self._record("converge", why)
            return Decision("converge", why)
        # An operator's read-only window: not "away" (the agent did not move it, and must not point back),
        # hands off until the PgBouncer points at a primary again.
        self.generation = state.generation
        self._record("converge", why)
        primary = state.primary if state.primary not in (None, to) else next(
            n for n in self.cluster.inventory.nodes if n != to)
        held = f"{origin}, points {self.pgbouncer} at {to}, a standby: the agent keeps it there until it points at a " \
               "primary"
        self.expected = Expected(primary, state.timeline, to, hands_off=held)
        self._record("hands-off", held)
        return Decision("converge", why)

    def _later(self, state: FleetState, why: str) -> Decision:
        """A generation not carried out yet: tried again ``CONVERGE_RETRY`` s later; logged once."""
        self._converge_retry_at = time.monotonic() + CONVERGE_RETRY
        if self._deferred != state.generation:
            self._deferred = state.generation
            self._record("stay", f"{why}; tried again every {CONVERGE_RETRY:g} s")
        return Decision("stay", why, quiet=True)

    def _run_failover(self, to: str, writable: bool, *, keep_pools: bool = False) -> None:
        """``failover``'s own repoint, for this agent's PgBouncer alone (``server_login_retry`` lowered)."""
        m = self.fleet.members[self.pgbouncer]
        retry = ({self.pgbouncer: m.config.get("server_login_retry", "?")}
                 if seconds_setting(m.config.get("server_login_retry")) > LOGIN_RETRY else {})
        plan = FailoverPlan(to, "primary" if writable else "standby",
                            self.fleet.plan_repoint(self.cluster.node(to)), {}, retry)
        run_failover(self.cluster, self.fleet, plan, keep_pools=keep_pools)

    def _point(self, to: str, writable: bool) -> bool:
        """Repoint the PgBouncer at ``to`` for the fleet's state, as the failover command would; whether it
        points there now."""
        try:
            self._run_failover(to, writable)
        except Exception as exc:  # noqa: BLE001 - OpsError, or a config that could not be read: tried again later
            self._record("failed", f"pointing {self.pgbouncer} at {to} for the fleet's state failed: {exc}")
        self._reopen()
        self._target = self._bouncer().target
        return self._target == to

    def _consider_promotion(self, e: Expected) -> None:
        """Away, the primary still not back: ``--auto-promote`` may promote the standby (``ops.autopromote``)."""
        assert self.promoter is not None
        standby, primary = self.probers[e.standby].seen(), self.probers[e.primary].seen()
        now = time.monotonic()
        s = standby.last if standby.last is not None and standby.last.role == "standby" else None
        if s is None or now - s.at > FRESH:
            self.promoter.want(False)  # the standby not seen now: nothing to promote, leave the lease to others
            return
        self.promoter.want(True)
        answers = primary.last is not None and primary.last.role == "primary" and now - primary.last.at < FRESH
        silent = None if answers or primary.last_ok is None else now - primary.last_ok.at
        self.promoter.consider(Candidate(e.primary, e.standby, s.lsn,
                                         primary.last_ok.lsn if primary.last_ok is not None else None, answers,
                                         silent))

    def _freeze(self) -> str | None:
        """Why the agent must change nothing now (``FREEZE_AFTER`` s without etcd taking a heartbeat), or
        None; entering and leaving the freeze are logged."""
        silent = self.heartbeat.silent_for() if self.heartbeat is not None else 0.0
        if silent < FREEZE_AFTER:
            if self.frozen is not None:
                self.frozen = None
                self._record("thawed", "etcd takes the heartbeats again: the agent decides again")
            return None
        if self.frozen is None:
            assert self.heartbeat is not None
            failing = self.heartbeat.failing or "the last one still waits for an answer"
            self.frozen = (f"etcd has taken no heartbeat for {FREEZE_AFTER:g} s ({failing}): its quorum is lost or "
                           "it is unreachable from here; the agent changes nothing until it takes them again")
            self._record("frozen", self.frozen)
        return self.frozen

    def _bouncer(self) -> BouncerState:
        """The PgBouncer as its console shows it now; a console that failed is opened again (once per step)."""
        m = self.fleet.members[self.pgbouncer]
        if m.console is not None and m.error is None:
            state = self.fleet.observe()[self.pgbouncer]
            if state.reachable:
                return state
        self._reopen()
        errors = self.fleet.open(timeout=max(1.0, self.timeout))
        if errors:
            return BouncerState(self.pgbouncer, False, error=errors[self.pgbouncer])
        return self.fleet.observe()[self.pgbouncer]

    def _reopen(self) -> None:
        """A fresh ``Fleet`` of one (its config file read again on the next ``open``)."""
        self.fleet.close()
        self.fleet = Fleet(self.cluster, [self.pgbouncer])

    def _adopt(self, e: Expected) -> None:
        """Expect ``e.standby`` as the primary from now on (it answers as one)."""
        try:
            self.expected = self.learn(e.standby)
        except OpsError as exc:
            e.hands_off = str(exc)
            self._record("hands-off", str(exc))

    def _repoint(self, to: str, why: str, *, back: bool, action: str | None = None) -> None:
        assert self.expected is not None
        started = time.monotonic()
        try:
            self._run_failover(to, back, keep_pools=back)
        except OpsError as exc:
            self._record("failed", f"pointing {self.pgbouncer} at {to} failed: {exc}")
            self._reopen()
            if self._bouncer().target != to:  # not switched: retry in a moment
                self.expected.retry_at = time.monotonic() + 2.0
                return
            why = f"{why} (switched, though the repoint reported the failure above)"
        else:
            self._reopen()  # the next repoint starts from the file as written now
        self.expected.away = not back
        self.expected.switched_at = time.monotonic()
        self.expected.switched_why = why
        self._target = to
        self._record(action or ("back" if back else "away"),
                     f"{self.pgbouncer} -> {to} in {time.monotonic() - started:.3f} s: {why}")

    def _record(self, action: str, message: str) -> None:
        self.decisions.append({"action": action, "message": message, "at": time.time()})
        self.say(f"{action}: {message}")
        self.hooks.emit("agent", action=action, message=message, pgbouncer=self.pgbouncer)

"""The plan's mock contingency scenarios, each a script of procedure steps under traffic.

A scenario receives a ``Procedures`` (the operations it may perform, on the lab or on real
hosts), a ``Recorder`` already collecting traffic, and the steady-state ``duration`` to hold
between steps. It marks each step on the timeline and notes the facts its expectations need,
among them the **states** the services' database went through (``Step.enter``): from when to
when it was read-only or unreachable for them.

A state the verdicts judge is held until every kind of operation of every service has met it
(``Step.hold_until``), bounded by ``EXTRA_HOLD`` seconds beyond ``duration``: a ``git push``
takes seconds on a busy machine, and a verdict on a window that held none would be a verdict on
nothing. Every scenario starts from, and leaves behind, a primary with a streaming standby.

``soft-outage`` makes the primary slow instead of gone: its processes throttled (cgroup v1 CPU
quota and write throttling, ``Procedures.throttle``) for ``duration`` seconds while ``status``
and the fleet exporter look at it and a thread times tiny commits on it all along
(``CommitSampler``); the SrhtSoftOutage alert rule is then tried on those commit times
(``drill.promcase``).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from . import promcase
from .recorder import Event, Recorder, State


class Fact(StrEnum):
    """The keys of a scenario's facts (``Step.facts``, ``report.json``'s ``facts``): a ``str``, so the JSON is
    the same, and a typo is an error."""

    READ_ONLY_FROM = "read_only_from"
    # The step that ends the read-only window began: readonly-failover's promotion, major-upgrade's
    # return of the fleet to the upgraded primary (writes may be taken before it is verified).
    WINDOW_CLOSING = "window_closing"
    READ_ONLY_UNTIL = "read_only_until"
    BACK_AT = "back_at"
    CRASH_AT = "crash_at"
    FAILOVER_AT = "failover_at"
    PROMOTED_AT = "promoted_at"
    STANDBY_RECEIVED = "standby_received"
    STATES = "states"
    HELD_LONGER = "held_longer"
    NEVER = "never"
    STEP_SECONDS = "step_seconds"
    SWITCHOVER = "switchover"
    THERE = "there"
    BACK = "back"
    CATCH_UP_SECONDS = "catch_up_seconds"
    UPGRADE = "upgrade"
    PAST = "past"
    VERSIONS = "versions"
    METRICS = "metrics"  # what the services' Prometheus metrics said, per service (integrations/drill)
    # soft-outage: when the primary was throttled (from, until), how, what status and the exporter
    # said before and during it, the commit times sampled all along, and the promtool case.
    SLOW_FROM = "slow_from"
    SLOW_UNTIL = "slow_until"
    THROTTLE = "throttle"
    SLOW_PRIMARY = "slow_primary"
    COMMITS = "commits"
    PROMTOOL = "promtool"
    AGENTS = "agents"  # unattended-crash: what each agent logged when it moved its PgBouncer
    PROMOTIONS = "promotions"  # unattended-promote: each agent's log lines saying it promoted


#: Seconds a scenario may hold a state beyond ``duration`` until every kind of operation met it ...
EXTRA_HOLD = 20.0
#: ... or three times the slowest operation of a kind still missing, on a machine that slow, up to this;
MOST_HOLD = 60.0
#: ... but no more than this (or three times the slowest) once every missing kind is settled: each has
#: ended a few operations since, none at the goal, and has none under way (``Progress.settled``).
SETTLED_HOLD = 3.0


class Procedures(Protocol):
    """What a scenario may do to the fleet; names are node names of the inventory."""

    def ready(self) -> None: ...
    def primary(self) -> str: ...
    def standby(self) -> str: ...
    def switchover(self, to: str) -> dict[str, Any]: ...
    def failover(self, to: str) -> None: ...
    def promote(self, node: str) -> None: ...
    def demote(self, node: str, primary: str) -> None: ...
    def stop(self, node: str, mode: str = "fast") -> None: ...
    def start(self, node: str) -> None: ...
    def kill(self, node: str) -> None: ...
    def receive_lsn(self, node: str) -> str | None: ...
    def wait_caught_up(self, node: str, timeout: float = 60) -> float: ...
    def rolling(self, kind: str, node: str, *, every: bool) -> dict[str, Any]: ...
    def major_upgrade(self, window: Callable[[str], None]) -> dict[str, Any]: ...
    def versions(self) -> dict[str, dict[str, Any]]: ...
    def numbered_burst(self, burst: int) -> None: ...
    def clock(self) -> str: ...
    def open_past(self, at: str) -> dict[str, Any]: ...
    def throttle(self, node: str) -> contextlib.AbstractContextManager[dict[str, Any]]: ...
    def timed_commits(self, node: str) -> contextlib.AbstractContextManager[Callable[[], float]]: ...
    def observe_slow_primary(self) -> dict[str, Any]: ...
    def agents(self, *, auto_promote: float | None = None) -> contextlib.AbstractContextManager[Any]: ...


class Progress(Protocol):
    """What ``Step.hold_until`` asks the runner, which knows the services' kinds of operation.

    ``missing(goal, facts)`` names the kinds (``"service op"``) that have not yet reached
    ``goal``: ``"met-read-only"`` (met the read-only state of the current window),
    ``"worked-again"`` (succeeded after ``facts[Fact.BACK_AT]``) or ``"worked"`` (succeeded at
    all: a baseline of every kind before a step); ``slowest(kinds)`` is the longest
    an operation of those kinds has taken so far, in seconds.
    """

    def missing(self, goal: str, facts: dict[str, Any]) -> list[str]: ...
    def slowest(self, kinds: list[str]) -> float: ...
    def mark(self) -> None: ...
    def settled(self, kinds: list[str]) -> bool: ...


@dataclass
class Step:
    """Holds the procedure and the clock while a scenario runs."""

    procedures: Procedures
    recorder: Recorder
    duration: float
    facts: dict[str, Any] = field(default_factory=dict)
    progress: Progress | None = None

    def hold(self, factor: float = 1.0) -> None:
        """Let traffic run in the current state."""
        time.sleep(self.duration * factor)

    def steady(self, factor: float = 1.0) -> tuple[Procedures, str, str]:
        """The procedures, the primary and its standby (observed now), after holding the steady state."""
        p = self.procedures
        old, new = p.primary(), p.standby()
        self.hold(factor)
        return p, old, new

    def hold_until(self, goal: str, factor: float = 1.0) -> None:
        """Hold ``duration * factor``, then longer until no kind misses ``goal``: at most ``EXTRA_HOLD``
        s more, or three times the slowest operation of a missing kind (at most ``MOST_HOLD``) on a
        machine so loaded that one takes longer. Once every missing kind is settled (it keeps ending
        operations, none at the goal, none under way), ``SETTLED_HOLD`` s (or three times the slowest) is
        enough: a broken service fails its verdict without holding the drill 20 s more.

        What was still missing when the bound ran out is noted in ``facts[Fact.NEVER][goal]``.
        """
        self.hold(factor)
        started = time.monotonic()
        left = self.progress.missing(goal, self.facts) if self.progress else []
        if self.progress is not None:
            self.progress.mark()
        while left and self.progress is not None:
            # Three times: a fetch that starts just after the state began must also end (ssh: 7-20 s
            # each on 2 busy cores); twice was found short (CI: ssh fetch never met read-only).
            slowest = 3 * self.progress.slowest(left)
            bound = min(MOST_HOLD, max(EXTRA_HOLD, slowest))
            elapsed = time.monotonic() - started
            if elapsed >= bound or (elapsed >= max(SETTLED_HOLD, slowest) and self.progress.settled(left)):
                break
            time.sleep(0.2)
            left = self.progress.missing(goal, self.facts)
        extra = time.monotonic() - started
        if extra >= 0.2:
            self.facts.setdefault(Fact.HELD_LONGER, {})[goal] = round(extra, 2)
        if left:
            self.facts.setdefault(Fact.NEVER, {})[goal] = left

    def note(self, *facts: str) -> float:
        """Note the time now (seconds from the scenario's start) as each of ``facts``."""
        now = self.recorder.now()
        for fact in facts:
            self.facts[fact] = now
        return now

    def enter(self, state: State | None, *, noted: str | None = None) -> None:
        """From now on the services' database is in ``state`` (None: writable again); ``noted`` also
        records when, as that fact."""
        now = self.note(*([noted] if noted else []))
        states = self.facts.setdefault(Fact.STATES, [])
        if states and states[-1][2] is None:
            states[-1][2] = now
        if state is not None:
            states.append([state.value, now, None])

    def do(self, label: str, action: Callable[[], Any]) -> Any:
        """Mark ``label`` on the timeline, run ``action``, record how long it took."""
        self.recorder.mark(label)
        started = time.monotonic()
        result = action()
        self.facts.setdefault(Fact.STEP_SECONDS, {})[label] = round(time.monotonic() - started, 3)
        return result


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    description: str
    planned: bool
    run: Callable[[Step], None]
    default: bool = True  # played when no --scenario is given


def planned_switchover(s: Step) -> None:
    p, old, new = s.steady()
    result = s.do(f"switchover {old} -> {new}", lambda: p.switchover(new))
    s.facts[Fact.SWITCHOVER] = result
    s.note(Fact.BACK_AT)
    s.hold_until("worked-again")


def readonly_failover_then_promotion(s: Step) -> None:
    """The plan's path: read-only failover, then stop the old primary, promote, demote."""
    p, old, new = s.steady()
    s.do(f"failover: PgBouncers -> {new} (read-only)", lambda: p.failover(new))
    s.enter(State.READ_ONLY, noted=Fact.READ_ONLY_FROM)
    s.hold_until("met-read-only")
    s.do(f"stop {old}", lambda: p.stop(old, "fast"))
    s.note(Fact.WINDOW_CLOSING)
    _promote_then_rejoin(s, old, new, promoted=Fact.READ_ONLY_UNTIL, rejoin=f"demote {old} to follow {new}")


def _promote_then_rejoin(s: Step, old: str, new: str, *, promoted: str, rejoin: str) -> None:
    """Promote ``new`` (the standby takes writes as soon as that is under way), note when it was
    done in ``facts[promoted]``, hold until every kind works again, then make ``old`` follow it."""
    p = s.procedures
    s.enter(None)
    s.do(f"promote {new}", lambda: p.promote(new))
    s.note(promoted, Fact.BACK_AT)
    s.hold_until("worked-again")
    s.do(rejoin, lambda: p.demote(old, new))
    s.hold(0.5)


def primary_crash(s: Step) -> None:
    """kill -9 the primary; read-only failover; promote; rejoin the old primary with pg_rewind."""
    p, old, new = s.steady()
    # The crash is when the kill is sent: connections die before kill() has made sure the postmaster is gone.
    s.enter(State.UNAVAILABLE, noted=Fact.CRASH_AT)
    s.do(f"kill -9 {old}", lambda: p.kill(old))
    time.sleep(0.5)  # the time it takes a watchdog or an operator to notice
    s.facts[Fact.STANDBY_RECEIVED] = p.receive_lsn(new)
    s.do(f"failover: PgBouncers -> {new}", lambda: p.failover(new))
    s.enter(State.READ_ONLY, noted=Fact.FAILOVER_AT)
    s.hold(0.5)
    _promote_then_rejoin(s, old, new, promoted=Fact.PROMOTED_AT, rejoin=f"rejoin {old} (pg_rewind)")


def unattended_crash(s: Step) -> None:
    """kill -9 the primary with an agent beside every PgBouncer (``srht-readonly agent``) and no operator
    step: the agents point every PgBouncer at the standby (read-only) by themselves; then the operator
    promotes it (the agents adopt it). The agents are stopped before the old primary rejoins with
    pg_rewind: that is the end of the unattended part, and nothing of the rejoin is judged on them."""
    p = s.procedures
    old, new = p.primary(), p.standby()
    with p.agents() as agents:
        s.hold()
        s.enter(State.UNAVAILABLE, noted=Fact.CRASH_AT)
        s.do(f"kill -9 {old} (no operator from here to the promotion)", lambda: p.kill(old))
        time.sleep(0.5)  # as primary-crash: the standby's receive position once its WAL receiver saw the end
        s.facts[Fact.STANDBY_RECEIVED] = p.receive_lsn(new)
        s.do("the agents point every PgBouncer at the standby", lambda: agents.wait_for("away:", timeout=15))
        s.enter(State.READ_ONLY, noted=Fact.FAILOVER_AT)
        s.facts[Fact.AGENTS] = agents.lines("away:")
        s.hold_until("met-read-only")
        s.enter(None)
        s.do(f"promote {new}", lambda: p.promote(new))
        s.note(Fact.PROMOTED_AT, Fact.BACK_AT)
        s.hold_until("worked-again")
    s.do(f"rejoin {old} (pg_rewind)", lambda: p.demote(old, new))
    s.hold(0.5)


#: unattended-promote: the agents' ``--auto-promote AFTER``, in seconds of the primary's silence.
AUTO_PROMOTE_AFTER = 3.0


def unattended_promote(s: Step) -> None:
    """As ``unattended_crash``, with the agents' ``--auto-promote``: no operator step at all. The agents
    point every PgBouncer at the standby, then one of them (the lease holder, once a majority saw the
    primary silent for ``AUTO_PROMOTE_AFTER`` s) fences the old primary and promotes the standby; the
    others adopt it. The agents are stopped before the old primary rejoins with pg_rewind."""
    p = s.procedures
    old, new = p.primary(), p.standby()
    with p.agents(auto_promote=AUTO_PROMOTE_AFTER) as agents:
        s.hold()
        s.enter(State.UNAVAILABLE, noted=Fact.CRASH_AT)
        s.do(f"kill -9 {old} (no operator from here on)", lambda: p.kill(old))
        time.sleep(0.5)
        s.facts[Fact.STANDBY_RECEIVED] = p.receive_lsn(new)
        s.do("the agents point every PgBouncer at the standby", lambda: agents.wait_for("away:", timeout=15))
        s.enter(State.READ_ONLY, noted=Fact.FAILOVER_AT)
        s.facts[Fact.AGENTS] = agents.lines("away:")
        s.do(f"an agent fences {old} and promotes {new} (--auto-promote {AUTO_PROMOTE_AFTER:g})",
             lambda: agents.wait_for_any("promote:", timeout=60))
        s.enter(None)
        s.note(Fact.PROMOTED_AT, Fact.BACK_AT)
        s.hold_until("worked-again")
        s.facts[Fact.PROMOTIONS] = {n: lines for n, lines in agents.lines("promote:").items() if lines}
    s.do(f"rejoin {old} (pg_rewind)", lambda: p.demote(old, new))
    s.hold(0.5)


def standby_crash(s: Step) -> None:
    """kill -9 the standby; services keep using the primary; bring it back up to date."""
    p = s.procedures
    standby = p.standby()
    s.hold()
    s.do(f"kill -9 {standby}", lambda: p.kill(standby))
    s.hold()
    s.do(f"start {standby}", lambda: p.start(standby))
    s.facts[Fact.CATCH_UP_SECONDS] = s.do(f"{standby} caught up", lambda: p.wait_caught_up(standby))
    s.facts[Fact.BACK_AT] = 0.0  # the services' database never changed: every kind must simply have worked
    s.hold_until("worked-again", 0.5)


def rolling_restart(s: Step) -> None:
    """``upgrade --minor`` on the same binaries: switch over, restart the old primary, switch back."""
    p, old, _ = s.steady(0.5)
    s.facts[Fact.UPGRADE] = s.do(f"upgrade --minor {old} (restart, same binaries)",
                                 lambda: p.rolling("minor", old, every=False))
    s.note(Fact.BACK_AT)
    s.hold_until("worked-again", 0.5)


def host_os_upgrade(s: Step) -> None:
    """``upgrade --host --all``: each node's PostgreSQL stopped while its host is "upgraded", as the standby."""
    p, old, _ = s.steady(0.5)
    s.facts[Fact.UPGRADE] = s.do(f"upgrade --host {old} --all", lambda: p.rolling("host", old, every=True))
    s.note(Fact.BACK_AT)
    s.hold_until("worked-again", 0.5)


def past_data(s: Step) -> None:
    """``past --at T`` under traffic: T noted between two bursts of numbered writes and deletes."""
    p = s.procedures
    s.hold(0.5)
    s.do("burst 1: numbered inserts and deletes", lambda: p.numbered_burst(1))
    at = s.do("note T (the primary's clock)", p.clock)
    s.do("burst 2: numbered inserts and deletes", lambda: p.numbered_burst(2))
    s.facts[Fact.PAST] = s.do("past --at T, compared, stopped", lambda: p.open_past(at))
    s.facts[Fact.BACK_AT] = 0.0  # the services' database never changed: every kind must simply have worked
    s.hold_until("worked-again", 0.5)


def major_upgrade(s: Step) -> None:
    """``upgrade --major``: read-only on the standby (held until every kind met it), pg_upgrade, writable on the
    new major, the standby rebuilt on it."""
    p, old, _ = s.steady(0.5)

    def window(state: str) -> None:
        if state == "read-only":
            s.enter(State.READ_ONLY, noted=Fact.READ_ONLY_FROM)
            s.hold_until("met-read-only")
            s.recorder.mark("pg_upgrade")
        elif state == "closing":  # the first PgBouncer may take writes from here on
            s.note(Fact.WINDOW_CLOSING)
        else:
            s.enter(None)
            s.note(Fact.READ_ONLY_UNTIL, Fact.BACK_AT)

    s.facts[Fact.UPGRADE] = s.do(f"upgrade --major {old}", lambda: p.major_upgrade(window))
    s.facts[Fact.VERSIONS] = p.versions()
    s.hold_until("worked-again")


class CommitSampler:
    """A thread timing a tiny commit (``Procedures.timed_commits``) on ``node`` every 50-150 ms while the
    block runs: ``samples`` are ``[t, seconds]`` (``t``: when it started, on the recorder's clock;
    ``seconds`` None when it failed)."""

    def __init__(self, procedures: Procedures, node: str, recorder: Recorder) -> None:
        self.procedures, self.node, self.recorder = procedures, node, recorder
        self.samples: list[list[Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drill-commit-sampler", daemon=True)

    def __enter__(self) -> CommitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        with self.procedures.timed_commits(self.node) as timed:
            while not self._stop.wait(random.uniform(0.05, 0.15)):
                started = self.recorder.now()
                try:
                    seconds: float | None = timed()
                except Exception:  # noqa: BLE001 - a failed timing is a sample (None), never the end of the scenario
                    seconds = None
                self.samples.append([round(started, 3), None if seconds is None else round(seconds, 6)])

    def phases(self, slow_from: float, slow_until: float) -> dict[str, list[float]]:
        """The commit times before the throttle, during it, and from ``GRACE`` s after its release."""
        out: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        for t, seconds in self.samples:
            if seconds is None:
                continue
            if t + seconds <= slow_from:
                out["before"].append(seconds)
            elif slow_from <= t and t + seconds <= slow_until:
                out["during"].append(seconds)
            elif t >= slow_until + SETTLE_AFTER_RELEASE:
                out["after"].append(seconds)
        return out


#: Seconds after the release of the throttle from which operations count as "after" (the backlog
#: built while throttled drains first); the same as ``verdicts.GRACE``.
SETTLE_AFTER_RELEASE = 2.0


def soft_outage(s: Step) -> None:
    """The primary's processes throttled (CPU quota, write throttling) for ``duration`` seconds: before,
    during, after, with ``status`` and the exporter asked before and during, and commits timed all along.
    The promtool case is built and run while the "after" phase is held (it needs only before and during)."""
    p = s.procedures
    node = p.primary()
    with CommitSampler(p, node, s.recorder) as sampler:
        s.hold_until("worked")  # a baseline of every kind of operation before the throttle
        looks = {"before": s.do("status and exporter look", p.observe_slow_primary)}
        with contextlib.ExitStack() as stack:
            s.facts[Fact.THROTTLE] = s.do(f"throttle {node}", lambda: stack.enter_context(p.throttle(node)))
            s.note(Fact.SLOW_FROM)
            started = time.monotonic()
            looks["during"] = s.do("status and exporter look (throttled)", p.observe_slow_primary)
            s.facts[Fact.SLOW_PRIMARY] = looks
            time.sleep(max(0.0, s.duration - (time.monotonic() - started)))
            s.recorder.mark(f"release {node}")
        s.note(Fact.SLOW_UNTIL, Fact.BACK_AT)
        measured = sampler.phases(s.facts[Fact.SLOW_FROM], s.facts[Fact.SLOW_UNTIL])
        promtool: dict[str, Any] = {}

        def try_the_rule() -> None:
            try:
                promtool.update(promcase.run(measured["before"], measured["during"]))
            except Exception as exc:  # noqa: BLE001 - judged: the verdict shows it
                promtool["error"] = f"{type(exc).__name__}: {exc}"
        case = threading.Thread(target=try_the_rule, name="drill-promcase", daemon=True)
        case.start()
        s.hold_until("worked-again")
    case.join(timeout=180)
    s.facts[Fact.COMMITS] = sampler.phases(s.facts[Fact.SLOW_FROM], s.facts[Fact.SLOW_UNTIL])
    s.facts[Fact.PROMTOOL] = promtool or {"error": "promtool test rules did not finish within 180 s"}


SCENARIOS = [
    Scenario("switchover", "Planned switchover",
             "PAUSE every PgBouncer, fast-stop the primary, check the standby replayed its shutdown "
             "checkpoint, promote, repoint, RESUME, demote the old primary to follow.", True, planned_switchover),
    Scenario("readonly-failover", "Read-only failover, then promotion (the plan's path)",
             "Repoint every PgBouncer at the hot standby (services go read-only), then shut off the "
             "old primary, promote the standby and demote the old primary.", True, readonly_failover_then_promotion),
    Scenario("primary-crash", "Primary killed without warning",
             "kill -9 the primary, read-only failover, promotion, old primary rejoined with pg_rewind.",
             False, primary_crash),
    Scenario("unattended-crash", "Primary killed, the agents fail over by themselves",
             "An agent beside every PgBouncer (srht-readonly agent); kill -9 of the primary and no operator step: "
             "the agents point every PgBouncer at the standby (read-only) within about a second; then promote "
             "(the agents adopt the new primary) and the old primary rejoins with pg_rewind.",
             False, unattended_crash, default=False),
    Scenario("unattended-promote", "Primary killed, the agents fail over and promote by themselves",
             "As unattended-crash, with the agents' --auto-promote: no operator step at all. The agents point every "
             f"PgBouncer at the standby; once a majority saw the primary silent for {AUTO_PROMOTE_AFTER:g} s, the "
             "agent holding the etcd lease fences the old primary and promotes the standby; the old primary then "
             "rejoins with pg_rewind. On the embedded lab the drill starts the etcd and writes the fence.",
             False, unattended_promote, default=False),
    Scenario("standby-crash", "Standby killed, brought back up to date",
             "kill -9 the standby; it restarts and catches up while the primary serves.", False, standby_crash),
    Scenario("host-os-upgrade", "Host OS upgrade, one node after the other (the plan's Alpine upgrade)",
             "upgrade --host --all: the primary's host after a switchover, then the other's after a switchover "
             "back; each node's PostgreSQL stopped while its host is upgraded.", True, host_os_upgrade),
    Scenario("past-data", "The database as it was at a moment in the past",
             "Under traffic: numbered inserts and deletes, a time T noted, more of them; past --at T opens a "
             "throwaway read-only instance from Barman's base backup and WAL; it must hold exactly what was "
             "committed by T; then it is removed.", True, past_data),
    Scenario("soft-outage", "Soft outage: the primary throttled, slow but online",
             "The primary's processes moved into a cgroup with a CPU quota and write throttling for --duration "
             "seconds, then released: every service's latency before, during and after; status and the exporter "
             "must flag the slow primary, and the soft-outage alert must fire on the commit times measured.",
             False, soft_outage),
    Scenario("major-upgrade", "Major upgrade (pg_upgrade, read-only window)",
             "upgrade --major: every PgBouncer to the standby (read-only), pg_upgrade of the primary to the new "
             "major, every PgBouncer back (writable), the standby rebuilt on the new major.", True, major_upgrade),
    Scenario("rolling-restart", "Rolling restart (upgrade --minor on the same binaries)",
             "Switch over, restart the old primary, switch back: what a minor upgrade does, without a new "
             "version (only one 15.x is installed here).", True, rolling_restart, default=False),
]

BY_NAME = {s.name: s for s in SCENARIOS}


#: How many of the operations that decided an expectation the report lists (the wrong ones first).
EVIDENCE_SHOWN = 60


@dataclass
class Expectation:
    """One verdict: what was expected, whether it held, what was observed, and the operations
    that decided it (``evidence``, the wrong ones first), so the report can show them."""

    text: str
    passed: bool
    observed: Any
    evidence: list[Event] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "passed": bool(self.passed), "observed": self.observed,
                "operations": [e.as_dict() for e in self.evidence[:EVIDENCE_SHOWN]],
                "operations_total": len(self.evidence)}

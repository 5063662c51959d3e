"""Judging what was recorded against what the plan promises in each scenario.

**Windows as users meet them.** The scenarios note the states the services' database went
through (``facts[Fact.STATES]``: read-only, unreachable, from when to when). An operation belongs
to the state it *met*: the one it observed (``Event.met``: a 25006 refusal, the
``Srht-Read-Only`` header, a "database unreachable" page), or, where it observed nothing (a
fetch that worked), the state at its start. Two sets follow from that:

* judged as read-only (``judged_read_only``): what observed the read-only state, plus what ran
  wholly inside a read-only window and did not observe a writable database: these must be
  refused with the explanation or dropped; an operation straddling a boundary that observed
  nothing is not judged on it (it may have done its writes before or after the window);
* met read-only (``met_read_only``): what observed it, or started inside the window. Every
  kind of operation of every service must have met it (``each_kind``): the scenario holds the
  state until they all have (``scenarios.Step.hold_until``), so "none required" never passes.

``common(service, scenario, events, facts, kinds=...)`` holds what every service owes:

* undisturbed scenarios (``switchover``, ``standby-crash``, ``host-os-upgrade``,
  ``rolling-restart``, ``past-data``, ``soft-outage``): every operation simply works: no error,
  nothing refused, nothing dropped, and every kind worked (in ``soft-outage`` the database is
  slow, never read-only);
* read-only windows (``readonly-failover``, ``major-upgrade``): no error at any time; what is
  judged as read-only was refused with the explanation or dropped; every kind met the
  read-only state; from ``GRACE`` after the promotion (or the fleet's return to the upgraded
  primary) everything works again, every kind at least once, with no restart;
* ``primary-crash``, ``unattended-crash`` and ``unattended-promote`` (``CRASHES``; in the second
  the agents do the failover, in the third the promotion too): errors only from operations under
  way while the primary was dead and PgBouncer still pointed at it (``crash_at`` to
  ``failover_at`` + ``GRACE``); from ``promoted_at`` + ``GRACE`` on, everything works again, every
  kind at least once. ``unattended-promote`` also: exactly one agent promoted, and writes worked
  again within ``WRITES_BACK`` s of the kill.

Operations still in flight longer than ``GRACE`` when the traffic stops are errors (the
recorder's ``close``), so hung work fails every one of these. ``database(...)`` judges the
ledger's lane: acknowledged writes kept, the write gap of planned switches (from the traffic's
start to its end, so a trailing stall counts), reads through a read-only failover, how soon a
crash was recovered from, and whether every lost write is explained by asynchronous replication.
A scenario that stopped before a step it is judged on fails with "not reached".

``soft_outage(...)`` judges the ``database`` lane of ``soft-outage`` (see ``drill.latency`` for
the phases): users met a soft outage (the writes' p95 while throttled at least ``SOFT_FACTOR``
times the one before, and ``SOFT_FLOOR`` s or more: else "no soft outage happened"), no error
and nothing refused, latency back near the baseline after the release (p95 at most
``BACK_FACTOR`` times the one before, or ``BACK_SLACK`` s above it), ``status`` flagged the
slow primary during the throttle and not before, the exporter's
``srht_readonly_primary_commit_seconds`` was over ``[status] slow-commit`` during it and under
it before, and the SrhtSoftOutage rule fired in the promtool case built from the commit times
(and not on the baseline alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..ops.sql import parse_lsn
from .latency import figures
from .ledger import KINDS as LEDGER_KINDS
from .ledger import LedgerResult
from .recorder import Event, Outcome, Recorder, State
from .scenarios import BY_NAME, Expectation, Fact

__all__ = ["CRASHES", "GRACE", "PLANNED_SWITCHES", "READ_ONLY_WINDOW", "UNDISTURBED",
           "after", "all_are", "common", "database", "each_kind", "first", "judged_read_only",
           "kinds_missing", "met", "met_read_only", "of_service", "reached", "read_only_window", "sample",
           "soft_outage", "state_at"]

#: Seconds after a step (failover, promotion) the services are given to notice it.
GRACE = 2.0

#: Scenarios in which the services' database never refuses a write.
UNDISTURBED = ("switchover", "standby-crash", "host-os-upgrade", "rolling-restart", "past-data", "soft-outage")
#: Scenarios that switch the primary with the writes paused, not refused: judged on the write gap.
PLANNED_SWITCHES = ("switchover", "host-os-upgrade", "rolling-restart")
#: Scenarios in which the primary is killed, the fleet fails over to the standby, which is then promoted:
#: by an operator's commands, or by the agents (``unattended-crash``: no operator until the promotion;
#: ``unattended-promote``: none at all, the agents promote too).
CRASHES = ("primary-crash", "unattended-crash", "unattended-promote")
#: unattended-promote: seconds from the kill within which writes must work again (the agents' promotion).
WRITES_BACK = 10.0
#: Scenarios with a planned read-only window (the fleet on the standby), then writable again.
READ_ONLY_WINDOW = ("readonly-failover", "major-upgrade")

#: soft-outage: the database lane's write p95 while throttled must be at least this many times the one before...
SOFT_FACTOR = 5.0
#: ... and at least this many seconds (a slowdown from 1 ms to 6 ms is no outage anyone meets);
SOFT_FLOOR = 0.05
#: after the release, at most this many times the one before, or this many seconds above it.
BACK_FACTOR = 3.0
BACK_SLACK = 0.05

#: Outcomes the plan allows for a write that met the read-only state.
DEGRADED = (Outcome.EXPLAINED, Outcome.DROPPED)


def of_service(events: Iterable[Event], service: str, *ops: str) -> list[Event]:
    return [e for e in events if e.service == service and (not ops or e.op in ops)]


def after(events: Iterable[Event], t: float) -> list[Event]:
    """Operations that started at or after ``t``."""
    return [e for e in events if e.started >= t]


def first(events: list[Event], predicate: Callable[[Event], bool]) -> Event | None:
    return min((e for e in events if predicate(e)), key=lambda e: e.t, default=None)


def read_only_window(facts: dict[str, Any]) -> tuple[float, float]:
    """When the database was certainly read-only: from ``read_only_from`` to the start of the step that
    ends the window (``window_closing``: ``readonly-failover``'s promotion, ``major-upgrade``'s return
    to the upgraded primary). ``read_only_until`` is when that step was *verified*, and writes are
    already taken during the verification."""
    closing = facts.get(Fact.WINDOW_CLOSING)
    return facts[Fact.READ_ONLY_FROM], facts[Fact.READ_ONLY_UNTIL] if closing is None else closing


def _windows(facts: Mapping[str, Any], state: State) -> list[tuple[float, float]]:
    return [(lo, float("inf") if hi is None else hi) for s, lo, hi in facts.get(Fact.STATES, []) if s == state.value]


def state_at(t: float, facts: Mapping[str, Any]) -> State:
    """The state the scenario had put the services' database in at ``t`` (writable outside every window)."""
    for s, lo, hi in facts.get(Fact.STATES, []):
        if lo <= t < (float("inf") if hi is None else hi):
            return State(s)
    return State.WRITABLE


def met(e: Event, facts: Mapping[str, Any]) -> State:
    """The state ``e`` met: what it observed, else the state at its start."""
    return e.met if e.met is not None else state_at(e.started, facts)


def met_read_only(events: Iterable[Event], facts: Mapping[str, Any]) -> list[Event]:
    return [e for e in events if met(e, facts) is State.READ_ONLY]


def judged_read_only(events: Iterable[Event], facts: Mapping[str, Any]) -> list[Event]:
    """Operations judged as read-only: observed so, or ran wholly inside a read-only window. Not one
    that observed a writable database: it met one (a write through a server connection PgBouncer
    had not yet closed, say), whatever the clock says."""
    windows = _windows(facts, State.READ_ONLY)
    return [e for e in events if e.met is State.READ_ONLY
            or (e.met is not State.WRITABLE and any(lo <= e.started and e.t <= hi for lo, hi in windows))]


def reached(events: Iterable[Event], goal: str, facts: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The kinds ``(service, op)`` among ``events`` that reached ``goal``.

    ``met-read-only``: met the read-only state; ``worked-again``: succeeded, started ``GRACE``
    after ``facts[Fact.BACK_AT]`` (when the database was writable again); ``worked``: succeeded.
    """
    if goal == "worked":
        return {(e.service, e.op) for e in events if e.outcome is Outcome.OK}
    if goal == "met-read-only":
        return {(e.service, e.op) for e in met_read_only(events, facts)}
    if goal == "worked-again":
        since = facts.get(Fact.BACK_AT, 0.0) + GRACE
        return {(e.service, e.op) for e in events if e.outcome is Outcome.OK and e.started >= since}
    raise ValueError(f"unknown goal {goal!r}")


def kinds_missing(events: Iterable[Event], kinds: Mapping[str, Sequence[str]], goal: str,
                  facts: Mapping[str, Any], *, in_flight: Iterable[tuple[str, str, float]] = (),
                  now: float = 0.0) -> list[str]:
    """The kinds (``"service op"``) with no operation that reached ``goal`` (see ``reached``).

    ``in_flight`` (``(service, op, started)``): operations still under way that *wait* while the
    database is read-only (a build): one waiting in the read-only state for ``GRACE`` seconds or
    more met it, though it can only end after the window.
    """
    done = reached(events, goal, facts)
    if goal == "met-read-only":
        done |= {(service, op) for service, op, began in in_flight
                 if now - began >= GRACE and state_at(began, facts) is State.READ_ONLY}
    return [f"{service} {op}" for service, ops in kinds.items() for op in ops if (service, op) not in done]


def each_kind(text: str, events: list[Event], kinds: Sequence[str], reached: Callable[[Event], bool]) -> Expectation:
    """At least one operation of each of ``kinds`` among ``events`` for which ``reached`` holds."""
    per = {k: sum(1 for e in events if e.op == k and reached(e)) for k in kinds}
    missing = [k for k, n in per.items() if not n]
    observed = ", ".join(f"{k} {n}" for k, n in per.items()) or "no kinds of operation"
    if missing:
        observed += f"; none for {', '.join(missing)}"
    return Expectation(text, bool(kinds) and not missing, observed, [e for e in events if reached(e)])


def sample(events: list[Event], what: str = "errors", limit: int = 3) -> str:
    """``"N errors (e.g. op error: detail (xK); ...)"``: the most frequent kinds first."""
    by: dict[str, int] = {}
    for e in events:
        key = f"{e.op} {e.outcome.value}: {e.detail}" if e.detail else f"{e.op} {e.outcome.value}"
        by[key] = by.get(key, 0) + 1
    top = sorted(by.items(), key=lambda kv: -kv[1])[:limit]
    examples = "; ".join(f"{k} (x{n})" for k, n in top)
    return f"{len(events)} {what}" + (f" (e.g. {examples})" if events else "")


def all_are(text: str, events: list[Event], allowed: tuple[Outcome, ...], *, at_least: int = 1) -> Expectation:
    """Every one of ``events`` ended in ``allowed``, and there were at least ``at_least``."""
    wrong = [e for e in events if e.outcome not in allowed]
    enough = len(events) >= at_least
    observed = f"{len(events)} operations" + (f", {sample(wrong, 'not ' + '/'.join(allowed))}" if wrong else "")
    return Expectation(text, enough and not wrong, observed, wrong + [e for e in events if e.outcome in allowed])


def no_errors(text: str, events: list[Event]) -> Expectation:
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    return Expectation(text, bool(events) and not errors, f"{len(events)} operations, {sample(errors)}", errors)


def _missing(facts: dict[str, Any], *keys: str) -> list[str]:
    return [k for k in keys if k not in facts]


def _not_reached(who: str, missing: list[str]) -> Expectation:
    return Expectation(f"{who}: the scenario reached the steps it is judged on", False,
                       f"not reached: {', '.join(missing)}")


def works_again(service: str, events: list[Event], kinds: Sequence[str], since: float) -> list[Expectation]:
    """From ``since`` on everything works, and every kind worked at least once."""
    back = after(events, since)
    return [all_are(f"{service}: everything works from {GRACE:g} s after the promotion", back, (Outcome.OK,)),
            each_kind(f"{service}: every kind of operation worked again after the promotion", back, kinds,
                      lambda e: e.outcome is Outcome.OK)]


def common(service: str, scenario: str, events: list[Event], facts: dict[str, Any], *,
           kinds: Sequence[str] = (), writes_wait: bool = False) -> list[Expectation]:
    """What every service owes in ``scenario`` (see the module doc); ``events`` are its own.

    ``kinds``: the kinds of operation the service does (``Event.op``); each must be seen doing
    what the scenario demands. ``writes_wait``: the service's writes block until the database
    is writable (the plan's retry, as a build runner's), so none is expected to end refused or
    dropped in the read-only window.
    """
    kinds = tuple(kinds) or tuple(sorted({e.op for e in events}))
    checks: list[Expectation] = []
    if scenario in UNDISTURBED:
        checks.append(no_errors(f"{service}: traffic ran and no user saw an error", events))
        degraded = [e for e in events if e.outcome in DEGRADED]
        checks.append(Expectation(f"{service}: nothing refused or dropped (the database never went read-only)",
                                  not degraded, sample(degraded, "refused or dropped"), degraded))
        checks.append(each_kind(f"{service}: every kind of operation worked", events, kinds,
                                lambda e: e.outcome is Outcome.OK))
    elif scenario in READ_ONLY_WINDOW:
        checks.append(no_errors(f"{service}: traffic ran and no user saw an unexplained error", events))
        if missing := _missing(facts, Fact.READ_ONLY_FROM, Fact.READ_ONLY_UNTIL):
            return [*checks, _not_reached(service, missing)]
        writes = [e for e in events if e.write]
        if writes and not writes_wait:
            checks.append(all_are(f"{service}: writes that met the read-only state were refused with the "
                                  "explanation or dropped", judged_read_only(writes, facts), DEGRADED))
        checks.append(each_kind(f"{service}: every kind of operation met the read-only state", events, kinds,
                                lambda e: met(e, facts) is State.READ_ONLY))
        checks += works_again(service, events, kinds, facts[Fact.READ_ONLY_UNTIL] + GRACE)
    elif scenario in CRASHES:
        if missing := _missing(facts, Fact.CRASH_AT, Fact.FAILOVER_AT, Fact.PROMOTED_AT):
            return [*checks, _not_reached(service, missing)]
        lo, hi = facts[Fact.CRASH_AT], facts[Fact.FAILOVER_AT] + GRACE
        errors = [e for e in events if e.outcome is Outcome.ERROR]
        stray = [e for e in errors if not (e.started <= hi and e.t >= lo)]
        checks.append(Expectation(
            f"{service}: errors only from operations under way between the crash and {GRACE:g} s after the failover",
            bool(events) and not stray, f"{sample(errors)}; {sample(stray, 'outside')}",
            stray + [e for e in errors if e not in stray]))
        checks += works_again(service, events, kinds, facts[Fact.PROMOTED_AT] + GRACE)
    return checks


def database(scenario: str, recorder: Recorder, facts: dict[str, Any], ledger: LedgerResult) -> list[Expectation]:
    """The ledger's lane (``database``) and the acknowledged writes, after ``scenario``."""
    events = of_service(recorder.events, "database")
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    checks = []
    if BY_NAME[scenario].planned or scenario == "standby-crash":
        checks.append(Expectation("no acknowledged write lost", not ledger.lost, len(ledger.lost)))
        checks.append(Expectation("database: no client saw an unexplained error", not errors, sample(errors), errors))
    if scenario in PLANNED_SWITCHES:
        gap = recorder.longest_write_gap("database")
        checks.append(Expectation("longest write gap under 1 s (from the traffic's start to its end)", gap < 1.0,
                                  f"{gap:.2f} s"))
        failed = [e for e in events if e.write and e.outcome is not Outcome.OK]
        checks.append(Expectation("no write failed", not failed, len(failed), failed))
    if scenario == "major-upgrade":
        checks.append(_upgraded(facts))
    if scenario == "past-data":
        checks += _past(facts)
    if scenario == "soft-outage":
        checks += soft_outage(events, facts, ledger)
    if scenario in READ_ONLY_WINDOW:
        if missing := _missing(facts, Fact.READ_ONLY_FROM, Fact.READ_ONLY_UNTIL):
            return [*checks, _not_reached("database", missing)]
        reads_failed = [e for e in events if not e.write and e.outcome is Outcome.ERROR]
        checks.append(Expectation("reads never failed", not reads_failed, len(reads_failed), reads_failed))
        # Stricter than a service's: the procedure said the fleet was read-only from the failover on,
        # so a write acknowledged in the window (by a primary still reached) is a finding too.
        lo, hi = read_only_window(facts)
        writes = [e for e in events if e.write and (e.met is State.READ_ONLY or lo <= e.started and e.t <= hi)]
        checks.append(all_are("writes in the read-only window were refused with an explanation", writes,
                              (Outcome.EXPLAINED,)))
        checks.append(each_kind("database: reads and writes met the read-only state", events, LEDGER_KINDS,
                                lambda e: met(e, facts) is State.READ_ONLY))
    if scenario in CRASHES:
        if missing := _missing(facts, Fact.CRASH_AT, Fact.FAILOVER_AT, Fact.PROMOTED_AT):
            return [*checks, _not_reached("database", missing)]
        steps = [("writes", True, Fact.PROMOTED_AT, "promotion")]
        if scenario == "primary-crash":
            steps.insert(0, ("reads", False, Fact.FAILOVER_AT, "failover"))
        else:  # unattended: nobody runs the failover, so reads are judged from the kill itself
            checks.append(_reads_back_after_the_kill(events, facts))
        if scenario == "unattended-promote":
            checks += _promoted_by_the_agents(events, facts)
        for what, write, since, step in steps:
            back = first(events, lambda e, w=write, t=facts[since]: e.t >= t and e.write == w  # type: ignore[misc]
                         and e.outcome is Outcome.OK)
            took = None if back is None else back.t - facts[since]
            checks.append(Expectation(f"{what} restored within {GRACE:g} s of the {step}",
                                      took is not None and took <= GRACE,
                                      "never" if took is None else f"{took:.2f} s", [back] if back else []))
        unexplained = _lost_not_explained(ledger, facts.get(Fact.STANDBY_RECEIVED))
        checks.append(Expectation("every lost write was committed past the WAL the standby had received",
                                  not unexplained, f"{len(ledger.lost)} lost, {len(unexplained)} unexplained"))
    if scenario == "standby-crash":
        catch_up = facts.get(Fact.CATCH_UP_SECONDS)
        checks.append(Expectation("standby caught up within 30 s of its restart",
                                  catch_up is not None and catch_up < 30,
                                  f"{catch_up:.2f} s" if catch_up is not None else "not reached"))
    return checks


def _reads_back_after_the_kill(events: list[Event], facts: dict[str, Any]) -> Expectation:
    """``unattended-crash``: from the kill to the end of the longest stretch without a good read that began
    before the agents' failover was seen and ended after the kill (so a read the dying primary still
    answered just after it is no "back": the outage after it is longer), and only if a read begun after
    the failover worked (else reads never came back)."""
    crash, failover = facts[Fact.CRASH_AT], facts[Fact.FAILOVER_AT]
    reads = sorted((e for e in events if not e.write and e.outcome is Outcome.OK), key=lambda e: e.t)
    gaps = [(b.t - a.t, i + 1) for i, (a, b) in enumerate(zip(reads, reads[1:], strict=False))
            if b.t >= crash and a.t <= failover]
    on_the_standby = any(e.started >= failover for e in reads)
    back = reads[max(gaps)[1]] if gaps and on_the_standby else None
    took = None if back is None else back.t - crash
    return Expectation(f"reads restored within {GRACE:g} s of the kill, with no operator (the agents' failover)",
                       took is not None and took <= GRACE, "never" if took is None else f"{took:.2f} s",
                       [back] if back else [])


def _promoted_by_the_agents(events: list[Event], facts: dict[str, Any]) -> list[Expectation]:
    """``unattended-promote``: exactly one agent promoted (two would be two primaries), and a write begun
    after the agents' failover (so not one the dying primary still took) was acknowledged within
    ``WRITES_BACK`` s of the kill."""
    promotions = facts.get(Fact.PROMOTIONS) or {}
    lines = [line for said in promotions.values() for line in said]
    crash, failover = facts[Fact.CRASH_AT], facts[Fact.FAILOVER_AT]
    back = first(events, lambda e: e.write and e.started >= failover and e.outcome is Outcome.OK)
    took = None if back is None else back.t - crash
    return [Expectation("exactly one agent promoted the standby", len(lines) == 1,
                        f"{len(lines)} promotion(s)" + "".join(f"; {n}: {line[line.find('promote:'):][:200]}"
                                                               for n, said in promotions.items() for line in said)),
            Expectation(f"writes restored within {WRITES_BACK:g} s of the kill, with no operator (the agents' "
                        "promotion)", took is not None and took <= WRITES_BACK,
                        "never" if took is None else f"{took:.2f} s", [back] if back else [])]


def _p95(lane: dict[str, dict[str, Any]], phase: str) -> float | None:
    return lane.get(phase, {}).get("p95")


def _ms(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds * 1000:.1f} ms"


def soft_outage(events: list[Event], facts: dict[str, Any], ledger: LedgerResult) -> list[Expectation]:
    """The ``database`` lane of ``soft-outage`` (``events``: its operations) and the monitoring of it."""
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    refused = [e for e in events if e.outcome in DEGRADED]
    checks = [Expectation("no acknowledged write lost", not ledger.lost, len(ledger.lost)),
              Expectation("database: no error and nothing refused (the primary was slow, not read-only)",
                          bool(events) and not errors and not refused,
                          f"{len(events)} operations, {sample(errors)}, {sample(refused, 'refused')}",
                          errors + refused)]
    if missing := _missing(facts, Fact.SLOW_FROM, Fact.SLOW_UNTIL):
        return [*checks, _not_reached("database", missing)]
    writes = figures([e for e in events if e.write], facts).get("database write", {})
    before, during, after = (_p95(writes, p) for p in ("before", "during", "after"))
    counts = ", ".join(f"{p} {writes.get(p, {}).get('n', 0)}" for p in ("before", "during", "after"))
    happened = before is not None and during is not None and during >= max(SOFT_FACTOR * before, SOFT_FLOOR)
    ratio = f" ({during / before:.0f}x)" if before and during else ""
    checks.append(Expectation(
        f"users met a soft outage: database write p95 while throttled at least {SOFT_FACTOR:g}x the one before "
        f"and {SOFT_FLOOR * 1000:.0f} ms or more", happened,
        f"p95 before {_ms(before)}, during {_ms(during)}{ratio}; writes {counts}"
        + ("" if happened else "; no soft outage happened")))
    back = before is not None and after is not None and after <= max(BACK_FACTOR * before, before + BACK_SLACK)
    checks.append(Expectation(
        f"latency back near the baseline after the release: database write p95 at most {BACK_FACTOR:g}x the one "
        f"before, or {BACK_SLACK * 1000:.0f} ms above it", back,
        f"p95 before {_ms(before)}, after {_ms(after)}; writes {counts}"))
    checks += _slow_primary_seen(facts.get(Fact.SLOW_PRIMARY) or {})
    checks.append(_promtool(facts.get(Fact.PROMTOOL)))
    return checks


def _slow_primary_seen(looks: dict[str, Any]) -> list[Expectation]:
    """``status`` and the exporter looked before the throttle and during it (``Procedures.observe_slow_primary``)."""
    before, during = looks.get("before") or {}, looks.get("during") or {}
    st_b, st_d = before.get("status") or {}, during.get("status") or {}
    ex_b, ex_d = before.get("exporter") or {}, during.get("exporter") or {}

    def said(st: dict[str, Any]) -> str:
        if st.get("error"):
            return f"error: {st['error']}"
        return (f"commit {_ms(st.get('commit_seconds'))}, "
                + ("; ".join(st.get("slow") or []) or "no slow-primary problem"))

    status_ok = bool(st_d.get("slow")) and not st_b.get("slow") and "slow" in st_b and not st_b.get("error")
    threshold = ex_d.get("threshold") or ex_b.get("threshold")
    v_b, v_d = ex_b.get("primary_commit_seconds"), ex_d.get("primary_commit_seconds")
    exporter_ok = threshold is not None and v_b is not None and v_d is not None and v_b <= threshold < v_d

    def shown(ex: dict[str, Any]) -> str:
        return f"error: {ex['error']}" if ex.get("error") else _ms(ex.get("primary_commit_seconds"))

    return [
        Expectation("status flagged the slow primary while it was throttled, and not before", status_ok,
                    f"before: {said(st_b) if st_b else 'not looked'}; during: {said(st_d) if st_d else 'not looked'}"),
        Expectation("the exporter's srht_readonly_primary_commit_seconds showed it: over [status] slow-commit while "
                    "throttled, under it before", exporter_ok,
                    f"before {shown(ex_b) if ex_b else 'not looked'}, during {shown(ex_d) if ex_d else 'not looked'}"
                    f" (slow-commit {_ms(threshold)})"),
    ]


def _promtool(result: dict[str, Any] | None) -> Expectation:
    text = "the SrhtSoftOutage alert fires in the promtool case built from the commit times (and not on the baseline)"
    if not result:
        return Expectation(text, False, "not reached")
    if result.get("error"):
        return Expectation(text, False, result["error"])
    ok = bool(result.get("fires")) and bool(result.get("quiet"))
    observed = (f"{result.get('before')} commits before (median {_ms(result.get('before_median'))}), "
                f"{result.get('during')} while throttled (mean {_ms(result.get('during_mean'))}): "
                f"{'fires' if result.get('fires') else 'does NOT fire'} on them, "
                f"{'quiet' if result.get('quiet') else 'FIRES'} on the baseline alone")
    if not ok:
        failed = result.get("fires_output") if not result.get("fires") else result.get("quiet_output")
        observed += f"; promtool: {failed}"
    return Expectation(text, ok, observed)


def _past(facts: dict[str, Any]) -> list[Expectation]:
    """After ``past-data``: the instance held exactly what was committed by T, and is gone."""
    past = facts.get(Fact.PAST)
    if not past:
        return [_not_reached("database", [Fact.PAST])]
    exact = not past["missing"] and not past["extra"] and past["rows"] == 90
    return [
        Expectation("past --at T holds exactly the numbered rows committed by T (11-100)", exact,
                    f"{past['rows']} rows; missing {past['missing'] or 'none'}; extra {past['extra'] or 'none'}"),
        Expectation("past --at T holds no ledger write begun after T", past["ledger_rows_begun_after_t"] == 0,
                    past["ledger_rows_begun_after_t"]),
        Expectation("the instance of the past is gone afterwards", bool(past["gone"]), past["gone"]),
    ]


def _upgraded(facts: dict[str, Any]) -> Expectation:
    """After ``major-upgrade``: every node runs the new major, one primary, the standby streams."""
    upgrade, versions = facts.get(Fact.UPGRADE) or {}, facts.get(Fact.VERSIONS) or {}
    to = upgrade.get("to")
    majors = {n: (v.get("version") or "?").split(".")[0] for n, v in versions.items()}
    roles = sorted(v.get("role") for v in versions.values())
    streaming = all(v.get("streaming") for v in versions.values() if v.get("role") == "standby")
    ok = bool(versions) and to is not None and set(majors.values()) == {str(to)} and \
        roles == ["primary", "standby"] and streaming
    return Expectation(f"the fleet ends on PostgreSQL {to or 'the new major'}: primary and streaming standby",
                       ok, {n: f"{v.get('role')} {v.get('version')}" + (" streaming" if v.get("streaming") else "")
                            for n, v in versions.items()} or "not reached")


def _lost_not_explained(ledger: LedgerResult, received: str | None) -> list[dict[str, Any]]:
    """Lost writes the standby had certainly received the commit of before it was promoted.

    A write is explained when its commit record may lie past ``received``: a position read after
    its acknowledgement (``committed_before``) is past ``received``, or, when none could be
    read, its row's LSN is within one WAL page of ``received`` or past it.
    """
    if received is None:
        return list(ledger.lost)
    limit = parse_lsn(received)
    return [w for w in ledger.lost
            if (parse_lsn(w["committed_before"]) <= limit if w.get("committed_before")
                else parse_lsn(w["lsn"]) < limit - 8192)]

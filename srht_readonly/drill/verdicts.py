"""Judging what was recorded against what the plan promises in each scenario.

``database(scenario, recorder, facts, ledger)`` judges the ledger's lane: acknowledged writes
kept, the write gap of planned switches, reads through a read-only failover, how soon a crash
was recovered from, and whether every lost write is explained by asynchronous replication.

``common(service, scenario, events, facts)`` holds what every service owes:

* planned or harmless scenarios (``switchover``, ``minor-upgrade``, ``standby-crash``): the
  database never goes read-only for the services, so every operation simply works: no error,
  nothing refused, nothing dropped;
* ``readonly-failover``: no error at any time; writes in the read-only window refused with the
  explanation or dropped (never done, never failed); from ``GRACE`` after the promotion,
  everything works again, with no restart;
* ``primary-crash``: errors only from operations that were under way while the primary was
  dead and PgBouncer still pointed at it (``crash_at`` to ``failover_at`` + ``GRACE``), and from
  ``promoted_at`` + ``GRACE`` on everything works again.

Each check also requires that there was traffic to judge, so that no verdict is passed on
nothing; a scenario that stopped before a step it is judged on fails with "not reached". The
probes of a real deployment are judged by ``common`` alone; the local stand-in services
(``integrations/drill``) add their own checks with ``during``/``after``/``required``.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

from ..ops.sql import parse_lsn
from .ledger import LedgerResult
from .recorder import Event, Outcome, Recorder
from .scenarios import BY_NAME, Expectation

__all__ = ["GRACE", "after", "all_are", "common", "database", "during", "first", "of_service", "read_only_window",
           "required", "sample", "started"]

#: Seconds after a step (failover, promotion) the services are given to notice it.
GRACE = 2.0

#: Scenarios in which the services' database never refuses a write.
UNDISTURBED = ("switchover", "minor-upgrade", "standby-crash")


def started(e: Event) -> float:
    return e.t - e.latency


def of_service(events: Iterable[Event], service: str, *ops: str) -> list[Event]:
    return [e for e in events if e.service == service and (not ops or e.op in ops)]


def during(events: Iterable[Event], lo: float, hi: float) -> list[Event]:
    """Operations that started and ended within ``[lo, hi]``."""
    return [e for e in events if started(e) >= lo and e.t <= hi]


def after(events: Iterable[Event], t: float) -> list[Event]:
    """Operations that started at or after ``t``."""
    return [e for e in events if started(e) >= t]


def read_only_window(facts: dict[str, Any]) -> tuple[float, float]:
    """When the database was certainly read-only in ``readonly-failover``: from ``read_only_from``
    to the start of the promotion step (``promote_started``; ``read_only_until`` is when the
    promotion was *verified*, and the standby already takes writes during that verification)."""
    return facts["read_only_from"], facts.get("promote_started", facts["read_only_until"])


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
    return Expectation(text, enough and not wrong, observed)


def required(events: list[Event], lo: float, hi: float) -> int:
    """1 if ``[lo, hi]`` certainly holds one of ``events``' kind from start to end, else 0.

    One starts every ``period`` (median gap between starts) and lasts ``took`` (median latency):
    a window at least as long as both together holds one whole.
    """
    took = statistics.median([e.latency for e in events] or [math.inf])
    starts = sorted(started(e) for e in events)
    period = statistics.median([b - a for a, b in itertools.pairwise(starts)] or [math.inf])
    return 1 if hi - lo >= period + took else 0


def _missing(facts: dict[str, Any], *keys: str) -> list[str]:
    return [k for k in keys if k not in facts]


def _not_reached(who: str, missing: list[str]) -> Expectation:
    return Expectation(f"{who}: the scenario reached the steps it is judged on", False,
                       f"not reached: {', '.join(missing)}")


def common(service: str, scenario: str, events: list[Event], facts: dict[str, Any], *,
           writes_wait: bool = False) -> list[Expectation]:
    """What every service owes in ``scenario`` (see the module doc); ``events`` are its own.

    ``writes_wait``: the service's writes block until the database is writable (the plan's retry,
    as a build runner's), so none is expected to end, refused or dropped, in the read-only window.
    """
    checks: list[Expectation] = []
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    if scenario in UNDISTURBED:
        checks.append(Expectation(f"{service}: traffic ran and no user saw an error", bool(events) and not errors,
                                  f"{len(events)} operations, {sample(errors)}"))
        degraded = [e for e in events if e.outcome in (Outcome.EXPLAINED, Outcome.DROPPED)]
        checks.append(Expectation(f"{service}: nothing refused or dropped (the database never went read-only)",
                                  not degraded, sample(degraded, "refused or dropped")))
    elif scenario == "readonly-failover":
        checks.append(Expectation(f"{service}: traffic ran and no user saw an unexplained error",
                                  bool(events) and not errors, f"{len(events)} operations, {sample(errors)}"))
        if missing := _missing(facts, "read_only_from", "read_only_until"):
            return [*checks, _not_reached(service, missing)]
        writes = [e for e in events if e.write]
        if writes and not writes_wait:
            lo, hi = read_only_window(facts)
            checks.append(all_are(f"{service}: writes in the read-only window refused with the explanation "
                                  "or dropped", during(writes, lo, hi), (Outcome.EXPLAINED, Outcome.DROPPED),
                                  at_least=required(writes, lo, hi)))
        checks.append(all_are(f"{service}: everything works from {GRACE:g} s after the promotion",
                              after(events, facts["read_only_until"] + GRACE), (Outcome.OK,)))
    elif scenario == "primary-crash":
        if missing := _missing(facts, "crash_at", "failover_at", "promoted_at"):
            return [*checks, _not_reached(service, missing)]
        lo, hi = facts["crash_at"], facts["failover_at"] + GRACE
        stray = [e for e in errors if not (started(e) <= hi and e.t >= lo)]
        checks.append(Expectation(
            f"{service}: errors only from operations under way between the crash and {GRACE:g} s after the failover",
            not stray, f"{sample(errors)}; {sample(stray, 'outside')}"))
        back = after(events, facts["promoted_at"] + GRACE)
        checks.append(all_are(f"{service}: everything works from {GRACE:g} s after the promotion", back,
                              (Outcome.OK,)))
    return checks


def database(scenario: str, recorder: Recorder, facts: dict[str, Any], ledger: LedgerResult) -> list[Expectation]:
    """The ledger's lane (``database``) and the acknowledged writes, after ``scenario``."""
    events = of_service(recorder.events, "database")
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    checks = []
    if BY_NAME[scenario].planned or scenario == "standby-crash":
        checks.append(Expectation("no acknowledged write lost", not ledger.lost, len(ledger.lost)))
        checks.append(Expectation("database: no client saw an unexplained error", not errors, sample(errors)))
    if scenario in ("switchover", "minor-upgrade"):
        gap = recorder.longest_write_gap("database")
        checks.append(Expectation("longest write gap under 1 s", gap < 1.0, f"{gap:.2f} s"))
        failed = [e for e in events if e.write and e.outcome is not Outcome.OK]
        checks.append(Expectation("no write failed", not failed, len(failed)))
    if scenario == "readonly-failover":
        if missing := _missing(facts, "read_only_from", "read_only_until"):
            return [*checks, _not_reached("database", missing)]
        lo, hi = read_only_window(facts)
        reads_failed = [e for e in events if not e.write and e.outcome is Outcome.ERROR]
        checks.append(Expectation("reads never failed", not reads_failed, len(reads_failed)))
        checks.append(all_are("writes during the read-only window were refused with an explanation",
                              during([e for e in events if e.write], lo, hi), (Outcome.EXPLAINED,)))
    if scenario == "primary-crash":
        if missing := _missing(facts, "failover_at", "promoted_at"):
            return [*checks, _not_reached("database", missing)]
        for what, write, since in (("reads", False, "failover_at"), ("writes", True, "promoted_at")):
            back = first(events, lambda e, w=write, t=facts[since]: e.t >= t and e.write == w  # type: ignore[misc]
                         and e.outcome is Outcome.OK)
            took = None if back is None else back.t - facts[since]
            checks.append(Expectation(f"{what} restored within {GRACE:g} s of the {since.split('_')[0]}",
                                      took is not None and took <= GRACE,
                                      "never" if took is None else f"{took:.2f} s"))
        unexplained = _lost_not_explained(ledger, facts.get("standby_received"))
        checks.append(Expectation("every lost write was committed past the WAL the standby had received",
                                  not unexplained, f"{len(ledger.lost)} lost, {len(unexplained)} unexplained"))
    if scenario == "standby-crash":
        catch_up = facts.get("catch_up_seconds")
        checks.append(Expectation("standby caught up within 30 s of its restart",
                                  catch_up is not None and catch_up < 30,
                                  f"{catch_up:.2f} s" if catch_up is not None else "not reached"))
    return checks


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


def first(events: list[Event], predicate: Callable[[Event], bool]) -> Event | None:
    return min((e for e in events if predicate(e)), key=lambda e: e.t, default=None)

"""Judging one service's recorded operations against what the plan promises in each scenario.

``common(service, scenario, events, facts)`` holds what every service owes:

* planned or harmless scenarios (``switchover``, ``minor-upgrade``, ``standby-crash``): the
  database never goes read-only for the services, so every operation simply works: no error,
  nothing refused, nothing dropped;
* ``readonly-failover``: no error at any time (refusals must be the explanatory ones);
* ``primary-crash``: errors only from operations that were under way while the primary was
  dead and PgBouncer still pointed at it (``crash_at`` to ``failover_at`` + ``GRACE``), and from
  ``promoted_at`` + ``GRACE`` on everything works again.

Each check also requires that there was traffic to judge, so that no verdict is passed on
nothing. The probes of a real deployment are judged by ``common`` alone; the local stand-in
services (``integrations/drill``) add their own checks for the read-only window with
``during``/``after``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .recorder import Event, Outcome, Recorder
from .scenarios import Expectation

__all__ = ["GRACE", "after", "all_are", "common", "during", "first", "of_service", "read_only_window", "sample",
           "started"]

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


def read_only_window(recorder: Recorder, facts: dict[str, Any]) -> tuple[float, float]:
    """When the database was certainly read-only in ``readonly-failover``: from ``read_only_from``
    to the start of the promotion step (``read_only_until`` is when the promotion was *verified*,
    and the standby already takes writes during that verification)."""
    lo, hi = facts["read_only_from"], facts["read_only_until"]
    promote = min((m.t for m in recorder.marks if m.label.startswith("promote ") and lo <= m.t <= hi), default=hi)
    return lo, promote


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


def common(service: str, scenario: str, events: list[Event], facts: dict[str, Any]) -> list[Expectation]:
    """What every service owes in ``scenario`` (see the module doc); ``events`` are its own."""
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
    elif scenario == "primary-crash":
        lo, hi = facts["crash_at"], facts["failover_at"] + GRACE
        stray = [e for e in errors if not (started(e) <= hi and e.t >= lo)]
        checks.append(Expectation(
            f"{service}: errors only from operations under way between the crash and {GRACE:g} s after the failover",
            not stray, f"{sample(errors)}; {sample(stray, 'outside')}"))
        back = after(events, facts["promoted_at"] + GRACE)
        checks.append(all_are(f"{service}: everything works from {GRACE:g} s after the promotion", back,
                              (Outcome.OK,)))
    return checks


def first(events: list[Event], predicate: Callable[[Event], bool]) -> Event | None:
    return min((e for e in events if predicate(e)), key=lambda e: e.t, default=None)

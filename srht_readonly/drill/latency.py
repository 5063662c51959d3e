"""Latency per service before, during and after a step that slows the database (soft-outage).

An operation's phase, from its start and end (seconds on the recorder's clock) against the
throttle's ``facts[Fact.SLOW_FROM]`` and ``facts[Fact.SLOW_UNTIL]``:

* ``before``: it ended before the throttle began;
* ``during``: it ran while the primary was throttled, at least in part (a push that began
  before and ended inside counts: it met the slow database);
* ``after``: it began ``SETTLE_AFTER_RELEASE`` s (2 s) or more after the release (the backlog
  built while throttled drains first; those in between are in no phase).

``figures`` gives p50/p95/p99 (nearest rank, seconds) and the count per service and phase, and
for the ``database`` lane's writes alone (``"database write"``: what the verdict compares);
``points`` the operations themselves for the report's latency lanes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .recorder import Event
from .scenarios import SETTLE_AFTER_RELEASE, Fact

PHASES = ("before", "during", "after")
#: Per service, at most this many operations are drawn (the slowest always among them).
POINTS_PER_LANE = 1500


def phase_of(e: Event, slow_from: float, slow_until: float) -> str | None:
    if e.t <= slow_from:
        return "before"
    if e.started < slow_until:
        return "during"
    if e.started >= slow_until + SETTLE_AFTER_RELEASE:
        return "after"
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0-100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def stats(values: Sequence[float]) -> dict[str, Any]:
    def r(v: float | None) -> float | None:
        return None if v is None else round(v, 4)
    return {"n": len(values), "p50": r(percentile(values, 50)), "p95": r(percentile(values, 95)),
            "p99": r(percentile(values, 99))}


def figures(events: Iterable[Event], facts: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{lane: {phase: {"n", "p50", "p95", "p99"}}}`` for every service, and ``"database write"``."""
    lo, hi = facts[Fact.SLOW_FROM], facts[Fact.SLOW_UNTIL]
    values: dict[str, dict[str, list[float]]] = {}
    for e in events:
        phase = phase_of(e, lo, hi)
        if phase is None:
            continue
        lanes = [e.service] + (["database write"] if e.service == "database" and e.write else [])
        for lane in lanes:
            values.setdefault(lane, {p: [] for p in PHASES})[phase].append(e.latency)
    return {lane: {p: stats(v[p]) for p in PHASES} for lane, v in sorted(values.items())}


def points(events: Iterable[Event], *, limit: int = POINTS_PER_LANE) -> dict[str, list[list[Any]]]:
    """``{service: [[start, latency, outcome], ...]}``: every operation, or ``limit`` of them per service
    (evenly spread, plus the slowest 1 %), to draw."""
    by: dict[str, list[Event]] = {}
    for e in events:
        by.setdefault(e.service, []).append(e)
    out: dict[str, list[list[Any]]] = {}
    for service, lane in sorted(by.items()):
        chosen = lane
        if len(lane) > limit:
            slowest = sorted(lane, key=lambda e: -e.latency)[:limit // 100]
            step = len(lane) / (limit - len(slowest))
            chosen = list({id(e): e for e in [lane[int(i * step)] for i in range(limit - len(slowest))]
                           + slowest}.values())
        out[service] = [[round(e.started, 3), round(e.latency, 5), e.outcome.value]
                        for e in sorted(chosen, key=lambda e: e.started)]
    return out

"""Which kinds of operation have reached a goal so far: what a scenario polls while it holds a state.

``Step.hold_until`` asks several times a second; a drill under ``--load excessive`` records tens
of thousands of operations, so ``Coverage`` reads only the events recorded since it last looked
(the answer for the facts it was asked with is kept; a change of the facts, such as a window
closing, starts over).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from . import verdicts
from .recorder import Recorder
from .scenarios import Fact


class Coverage:
    """``missing(goal, facts)`` over ``recorder`` for the services' ``kinds``.

    ``waiting``: the services whose operations wait while the database is read-only (a build
    runner); only theirs count as having met the read-only state while still under way.
    """

    def __init__(self, recorder: Recorder, kinds: Mapping[str, Sequence[str]], *,
                 waiting: Collection[str] = ()) -> None:
        self.recorder = recorder
        self.kinds = kinds
        self.waiting = set(waiting)
        self._done: dict[str, tuple[set[tuple[str, str]], int]] = {}
        self._slowest: dict[tuple[str, str], float] = {}
        self._timed = 0
        self._settle_from = 0  # the event index a hold started at (``mark``)
        self._settle_seen = 0
        self._ended: dict[tuple[str, str], int] = {}

    def mark(self) -> None:
        """From now on ``settled`` counts the operations that end."""
        self._settle_from = self._settle_seen = len(self.recorder.events_since(0))
        self._ended = {}

    def settled(self, kinds: list[str], at_least: int = 3) -> bool:
        """Whether every one of ``kinds`` has ended ``at_least`` operations since ``mark`` and has none under way:
        they finish, and not at the goal, so holding longer would only add more of the same.

        A kind with an operation still under way (a slow push, a build waiting, a client held by a
        paused PgBouncer) is never settled: it may yet reach the goal, or hang, which is judged. (Under
        excessive load a push may take 25 s, four times the slowest seen before it: any shorter rule for
        "stuck" ended a hold too early there.)
        """
        new = self.recorder.events_since(self._settle_seen)
        self._settle_seen += len(new)
        for e in new:
            self._ended[(e.service, e.op)] = self._ended.get((e.service, e.op), 0) + 1
        busy = {(o.service, o.op) for o in self.recorder.in_flight()}
        wanted = [(service, op) for service, _, op in (k.partition(" ") for k in kinds)]
        return bool(wanted) and all(k not in busy and self._ended.get(k, 0) >= at_least for k in wanted)

    def missing(self, goal: str, facts: Mapping[str, Any]) -> list[str]:
        key = json.dumps([goal, facts.get(Fact.STATES, []), facts.get(Fact.BACK_AT)])
        done, seen = self._done.get(key, (set(), 0))
        new = self.recorder.events_since(seen)
        done |= verdicts.reached(new, goal, facts)
        self._done[key] = (done, seen + len(new))
        under_way = [(o.service, o.op, o.started - self.recorder.t0) for o in self.recorder.in_flight()
                     if o.service in self.waiting]
        left = verdicts.kinds_missing([], self.kinds, goal, facts, in_flight=under_way, now=self.recorder.now())
        return [k for k in left if tuple(k.partition(" ")[::2]) not in done]

    def slowest(self, kinds: list[str]) -> float:
        """The longest an operation of ``kinds`` (``"service op"``) took so far (0 when none ended).

        Operations still under way do not count: one stuck behind a paused PgBouncer says nothing
        of how slow the machine is, and would stretch the hold to its upper bound.
        """
        new = self.recorder.events_since(self._timed)
        self._timed += len(new)
        for e in new:
            key = (e.service, e.op)
            self._slowest[key] = max(self._slowest.get(key, 0.0), e.latency)
        wanted = {(service, op) for service, _, op in (k.partition(" ") for k in kinds)}
        return max((self._slowest.get(k, 0.0) for k in wanted), default=0.0)

"""What each service saw, when: a thread-safe log of operations and scenario marks.

Outcomes are from the user's side of the screen:

* ``ok``: it worked;
* ``explained``: refused with the read-only explanation (503 page, READ_ONLY JSON, the SSH
  message, a clean task failure naming the reason): the plan's intended degradation;
* ``dropped``: it worked for the user, and a write the plan allows to lose was dropped;
* ``error``: anything else the user saw (500, traceback, connection error, wrong message), and
  an operation still under way longer than the grace period when the traffic stopped (hung).

Each operation may also say which state of the database it **met** (``State``), from what it
observed: a ``25006`` refusal, the ``Srht-Read-Only`` header, a "database unreachable" page.
Where it observed nothing (a ``git fetch`` that worked), ``met`` is ``None`` and the verdicts
decide from the step times.

An operation is either recorded when it ends (``record``) or opened with ``begin`` and closed
with ``end``: opened ones are *in flight*, and ``close(grace)`` records each one in flight for
longer than ``grace`` as an error, so work that never finishes is judged instead of forgotten.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    EXPLAINED = "explained"
    DROPPED = "dropped"
    ERROR = "error"


class State(StrEnum):
    """The state of the database an operation met."""

    WRITABLE = "writable"
    READ_ONLY = "read-only"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Event:
    """One operation: when it ended (seconds from the scenario's start), for whom, how it went."""

    t: float
    service: str
    op: str
    outcome: Outcome
    latency: float
    write: bool = False
    detail: str = ""
    met: State | None = None

    @property
    def started(self) -> float:
        return self.t - self.latency

    def as_dict(self) -> dict[str, object]:
        return {"service": self.service, "op": self.op, "start": round(self.started, 3), "end": round(self.t, 3),
                "outcome": self.outcome.value, "write": self.write, "met": self.met.value if self.met else None,
                "detail": self.detail}


@dataclass(frozen=True)
class Mark:
    """A step of the procedure (``pause``, ``promote``...), drawn as a line on the timeline."""

    t: float
    label: str


@dataclass(frozen=True)
class Operation:
    """An operation in flight, from ``Recorder.begin`` to ``Recorder.end``."""

    service: str
    op: str
    started: float  # time.monotonic()
    write: bool = False
    key: int = field(default=0, compare=False)


class Recorder:
    """Collects events and marks for one scenario; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._marks: list[Mark] = []
        self._in_flight: dict[int, Operation] = {}
        self._keys = itertools.count(1)
        self._closed = False
        self.t0 = time.monotonic()
        #: When the traffic started and stopped (seconds from ``t0``): the bounds of the write gap.
        self.traffic_from: float | None = None
        self.traffic_until: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(self, service: str, op: str, *, write: bool = False, started: float | None = None) -> Operation:
        """Open an operation (judged as hung by ``close`` if it is still in flight then)."""
        operation = Operation(service, op, time.monotonic() if started is None else started, write, next(self._keys))
        with self._lock:
            if not self._closed:
                self._in_flight[operation.key] = operation
        return operation

    def end(self, operation: Operation, outcome: Outcome, *, detail: str = "",
            met: State | None = None) -> Event | None:
        """Close ``operation``; its event, or None if it was already judged (hung) or the recorder is closed."""
        with self._lock:
            if self._in_flight.pop(operation.key, None) is None:
                return None
            return self._append(operation, outcome, detail, met, time.monotonic())

    def record(self, service: str, op: str, outcome: Outcome, *, started: float, write: bool = False,
               detail: str = "", met: State | None = None) -> Event | None:
        """Log an operation that began at ``started`` (``time.monotonic()``) and just ended."""
        with self._lock:
            if self._closed:
                return None
            return self._append(Operation(service, op, started, write), outcome, detail, met, time.monotonic())

    def _append(self, op: Operation, outcome: Outcome, detail: str, met: State | None, end: float) -> Event:
        event = Event(end - self.t0, op.service, op.op, Outcome(outcome), end - op.started, op.write, detail[:300],
                      met)
        self._events.append(event)
        return event

    def in_flight(self) -> list[Operation]:
        with self._lock:
            return list(self._in_flight.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no operation is in flight (True), or ``timeout`` seconds (False)."""
        give_up = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() >= give_up:
                return False
            time.sleep(0.05)
        return True

    def close(self, *, grace: float) -> list[Event]:
        """Stop recording: every operation in flight for more than ``grace`` seconds becomes an error
        (hung, with its age); younger ones were started moments ago and are not judged. Returns the hung."""
        end = time.monotonic()
        with self._lock:
            if self._closed:
                return []
            hung = [self._append(op, Outcome.ERROR, f"hung: still running {end - op.started:.1f} s after it "
                                                    "started when the traffic stopped", None, end)
                    for op in self._in_flight.values() if end - op.started > grace]
            self._in_flight.clear()
            self._closed = True
            if self.traffic_until is None:
                self.traffic_until = end - self.t0
        return hung

    def mark(self, label: str) -> Mark:
        mark = Mark(self.now(), label)
        with self._lock:
            self._marks.append(mark)
        return mark

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def events_since(self, index: int) -> list[Event]:
        """The events recorded after the first ``index`` (they are only ever appended)."""
        with self._lock:
            return self._events[index:]

    @property
    def marks(self) -> list[Mark]:
        with self._lock:
            return list(self._marks)

    def counts(self) -> dict[str, Counter[str]]:
        """{service: Counter(outcome -> n)} so far."""
        result: dict[str, Counter[str]] = {}
        for e in self.events:
            result.setdefault(e.service, Counter())[e.outcome.value] += 1
        return result

    def longest_write_gap(self, service: str | None = None) -> float:
        """Longest time without a successful write (of ``service``, or of any), in seconds.

        The traffic's start and end count as bounds, so a stall at either end (a PgBouncer left
        paused at the end of a switchover) is a gap too, not a quiet tail.
        """
        bounds = [t for t in (self.traffic_from, self.traffic_until) if t is not None]
        writes = [e.t for e in self.events
                  if e.write and e.outcome is Outcome.OK and (service is None or e.service == service)]
        times = sorted(bounds + writes)
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

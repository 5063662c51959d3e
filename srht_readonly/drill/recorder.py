"""What each service saw, when: a thread-safe log of outcomes and scenario marks.

Outcomes are from the user's side of the screen:

* ``ok``: it worked;
* ``explained``: refused with the read-only explanation (503 page, READ_ONLY JSON, the SSH
  message, a clean task failure naming the reason): the plan's intended degradation;
* ``dropped``: it worked for the user, and a write the plan allows to lose was dropped;
* ``error``: anything else the user saw (500, traceback, connection error, wrong message).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    OK = "ok"
    EXPLAINED = "explained"
    DROPPED = "dropped"
    ERROR = "error"


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


@dataclass(frozen=True)
class Mark:
    """A step of the procedure (``pause``, ``promote``...), drawn as a line on the timeline."""

    t: float
    label: str


class Recorder:
    """Collects events and marks for one scenario; safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._marks: list[Mark] = []
        self._closed = False
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, service: str, op: str, outcome: Outcome, *, started: float,
               write: bool = False, detail: str = "") -> Event:
        """Log an operation that began at ``started`` (``time.monotonic()``) and just ended."""
        end = time.monotonic()
        event = Event(end - self.t0, service, op, Outcome(outcome), end - started, write, detail[:300])
        with self._lock:
            if not self._closed:
                self._events.append(event)
        return event

    def close(self) -> None:
        """Keep nothing recorded from now on: the scenario's traffic has stopped and is being judged."""
        with self._lock:
            self._closed = True

    def mark(self, label: str) -> Mark:
        mark = Mark(self.now(), label)
        with self._lock:
            self._marks.append(mark)
        return mark

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

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
        """Longest time between two successful writes (of ``service``, or of any), in seconds."""
        times = sorted(e.t for e in self.events
                       if e.write and e.outcome is Outcome.OK and (service is None or e.service == service))
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

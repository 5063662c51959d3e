"""``ReadOnlyMonitor``: one per process, knows whether the database currently takes writes.

Promises:

* ``monitor.read_only`` costs no I/O while the database is writable: it reads one field. If an
  announcement file is configured, one caller every ``recheck`` seconds also ``stat()``s it
  (a monotonic clock comparison decides; no query, no read unless the file changed).
* ``monitor.observe(exc)`` turns the monitor read-only at once on a read-only failure. A lost
  connection only makes the next ``read_only`` read probe the database once.
* While read-only, ``read_only`` re-probes (``pg_is_in_recovery()``, ``transaction_read_only``)
  at most once per interval drawn from ``[(1 - jitter) * recheck, recheck]``: one thread probes,
  the others get the cached answer at once. A probe through the engine waits at most
  ``probe_timeout`` seconds in all (pool checkout included); one that gets no answer, for
  whatever reason, means unavailable (``failure`` is ``Failure.UNAVAILABLE``: users hear that
  the database cannot be reached), never "the database refuses writes". The monitor turns
  writable by itself when a probe says so, so a promotion is noticed at most ``recheck`` seconds
  (plus one probe) later.
* An operator announcement in effect (see :class:`Announcement`) makes the monitor read-only
  until it ends or the file is removed; no probe overrides it.
* Every change (and every new or withdrawn announcement) is logged once and handed to the
  listeners as a :class:`MonitorEvent`.
* ``monitor.hint(...)`` takes what another process found (``srht_readonly.shared_state``): a
  read-only hint is applied at once (reason ``"shared"``) and re-verified by the next recheck
  like any other read-only state; a writable hint is never taken on trust when the monitor can
  probe: it probes at once, in the caller's thread.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypedDict

from ._announcement import Announcement, AnnouncementFile
from ._probe import probe_engine
from .errors import Failure, classify, first_line

__all__ = ["ANNOUNCE_ENV", "Announcement", "MonitorEvent", "MonitorState", "ReadOnlyMonitor", "Reason"]

logger = logging.getLogger(__name__)

#: Environment variable naming the announcement file when ``announce_file`` is not given.
ANNOUNCE_ENV = "SRHT_READONLY_ANNOUNCE_FILE"

_FROM_ENV: Any = object()
_monitors: weakref.WeakSet[ReadOnlyMonitor] = weakref.WeakSet()


class Reason(StrEnum):
    """Why the monitor believes what it does (a ``str``: JSON and comparisons with text still work)."""

    START = "start"
    ERROR = "error"  # an observed failure
    PROBE = "probe"
    ANNOUNCEMENT = "announcement"
    EXPIRED = "expired"  # read-only with no probe available, and the recheck time passed
    MANUAL = "manual"
    SHARED = "shared"  # another process's hint (srht_readonly.shared_state), not yet re-verified here


@dataclass(frozen=True)
class MonitorState:
    """A snapshot of what the monitor believes, and why.

    ``reason`` is a ``Reason``; ``since`` is in seconds since the epoch; ``detail`` is a one-line
    explanation for logs and pages.
    """

    read_only: bool
    since: float
    reason: Reason
    detail: str
    failure: Failure | None = None


class MonitorEvent(TypedDict):
    """What listeners receive: ``event`` is ``"read-only"``, ``"writable"`` or ``"announcement"``."""

    event: str
    read_only: bool
    since: float
    reason: Reason
    detail: str
    failure: Failure | None
    announcement: Announcement | None


class ReadOnlyMonitor:
    """Per-process, thread-safe knowledge of whether the database is read-only.

    ``engine`` (a SQLAlchemy engine, or set later by ``srht_readonly.sqlalchemy.instrument``)
    is used for probes; ``probe`` replaces it with any callable returning True when the
    database is read-only (and raising when it is unreachable). Without either, a read-only
    state simply expires after ``recheck`` seconds. A probe through ``engine`` takes at most
    ``probe_timeout`` seconds, waiting for a pooled connection included (past that, the
    database counts as unavailable); a ``probe`` callable must bound itself. ``announce_file``
    defaults to ``$SRHT_READONLY_ANNOUNCE_FILE``; pass None to ignore announcements.
    """

    def __init__(
        self,
        engine: Any = None,
        *,
        recheck: float = 2.0,
        jitter: float = 0.25,
        probe: Callable[[], bool] | None = None,
        probe_timeout: float = 2.0,
        announce_file: str | os.PathLike[str] | None = _FROM_ENV,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if recheck <= 0:
            raise ValueError("recheck must be a positive number of seconds")
        if not 0 <= jitter < 1:
            raise ValueError("jitter must be a fraction in [0, 1)")
        if probe_timeout <= 0:
            raise ValueError("probe_timeout must be a positive number of seconds")
        self.recheck = recheck
        self.jitter = jitter
        self.probe_timeout = probe_timeout
        self._engine = engine
        self._probe = probe
        self._clock = clock
        self._wall = wall_clock
        if announce_file is _FROM_ENV:
            announce_file = os.environ.get(ANNOUNCE_ENV) or None
        self._watcher = AnnouncementFile(announce_file) if announce_file is not None else None
        self._state = MonitorState(False, wall_clock(), Reason.START, "assumed writable at start")
        self._generation = 0
        self._suspect = False
        self._next_probe = 0.0
        self._announce_due = 0.0
        self._listeners: tuple[Callable[[MonitorEvent], object], ...] = ()
        self._probe_observers: tuple[Callable[[float, str], object], ...] = ()
        self._init_locks()
        _monitors.add(self)

    def _init_locks(self) -> None:
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._announce_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """Whether writes should be refused now. No I/O while writable (see the module doc)."""
        if self._state.read_only or self._suspect:
            return self._refresh()
        if self._watcher is not None and self._clock() >= self._announce_due:
            return self._refresh()
        return False

    @property
    def state(self) -> MonitorState:
        """The current :class:`MonitorState`, without probing."""
        return self._state

    @property
    def announcement(self) -> Announcement | None:
        """The operator's announcement, whether already in effect or still ahead (for banners)."""
        return self._watcher.current if self._watcher is not None else None

    @property
    def engine(self) -> Any:
        """The engine probes go through, if any."""
        return self._engine

    def use_engine(self, engine: Any) -> None:
        """Probe through ``engine`` from now on (``instrument`` calls this)."""
        self._engine = engine

    # -- feeding -------------------------------------------------------------------------

    def observe(self, exc: BaseException) -> Failure | None:
        """Learn from a database error; returns its classification.

        A read-only failure turns the monitor read-only at once; a lost connection or an
        unknown COMMIT makes the next ``read_only`` read probe once (if a probe is available).
        """
        failure = classify(exc)
        if failure is Failure.READ_ONLY:
            if not self._state.read_only:
                self._transition(True, Reason.ERROR, first_line(exc), failure)
        elif failure is not None and not self._state.read_only and self._can_probe():
            self._suspect = True
        return failure

    def check(self) -> bool:
        """Probe now (waiting for a probe already running) and return ``read_only``."""
        self._check_announcement(self._clock(), force=True)
        with self._probe_lock:
            self._probe_locked(force=True)
        return self._state.read_only

    def hint(self, read_only: bool, detail: str, failure: Failure | None = None) -> None:
        """Learn what another process found (``srht_readonly.shared_state`` calls this).

        A **read-only** hint turns a writable monitor read-only at once, with reason
        ``Reason.SHARED``, ``detail`` and ``failure`` (``Failure.UNAVAILABLE`` when the other
        process could not reach the database); nothing is queried. It is then re-verified like
        any read-only state: the next recheck (``recheck`` seconds at most) probes, or, with no
        probe available, the state expires. A monitor already read-only for reasons of its own
        keeps them.

        A **writable** hint is never taken on trust when the monitor can probe: it probes now,
        in the calling thread (at most ``probe_timeout`` seconds), and turns writable only if
        the database says so. Without a probe, a read-only state that is not an announcement
        turns writable. An operator's announcement in effect is never overridden.
        """
        state = self._state
        if read_only:
            if state.read_only and (state.reason is not Reason.SHARED or state.failure == failure):
                return
            self._transition(True, Reason.SHARED, detail, failure)
            return
        if not state.read_only or state.reason is Reason.ANNOUNCEMENT:
            return
        if self._can_probe():
            self.check()
        else:
            self._transition(False, Reason.SHARED, detail)

    def set_read_only(self, detail: str = "set by the application") -> None:
        """Turn read-only by hand (tests, maintenance scripts); probes may turn it back."""
        self._transition(True, Reason.MANUAL, detail, None)

    def set_writable(self, detail: str = "set by the application") -> None:
        """Turn writable by hand; the next read-only failure turns it back."""
        self._transition(False, Reason.MANUAL, detail, None)

    def add_listener(
        self, listener: Callable[[MonitorEvent], object]
    ) -> Callable[[MonitorEvent], object]:
        """Call ``listener(event)`` on every change; returns it, so it works as a decorator.

        Listeners run in the thread that noticed the change; their exceptions are logged.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)
        return listener

    def add_probe_observer(self, observer: Callable[[float, str], object]) -> Callable[[float, str], object]:
        """Call ``observer(seconds, result)`` after every probe (``result``: ``writable``,
        ``read_only`` or ``error``), in the probing thread; returns it. ``srht_readonly.metrics``
        times the monitor's own probes with it."""
        with self._lock:
            self._probe_observers = (*self._probe_observers, observer)
        return observer

    def remove_probe_observer(self, observer: Callable[[float, str], object]) -> None:
        with self._lock:
            self._probe_observers = tuple(o for o in self._probe_observers if o != observer)

    def _timed(self, seconds: float, result: str) -> None:
        for observer in self._probe_observers:
            try:
                observer(seconds, result)
            except Exception:
                logger.exception("probe observer %r failed", observer)

    def remove_listener(self, listener: Callable[[MonitorEvent], object]) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            self._listeners = tuple(fn for fn in self._listeners if fn != listener)

    # -- internals -----------------------------------------------------------------------

    def _can_probe(self) -> bool:
        return self._probe is not None or self._engine is not None

    def _interval(self) -> float:
        return self.recheck * (1.0 - self.jitter * random.random())

    def _refresh(self) -> bool:
        now = self._clock()
        if self._watcher is not None and now >= self._announce_due:
            self._check_announcement(now)
        state = self._state
        due = self._suspect or (state.read_only and now >= self._next_probe)
        if due and self._probe_lock.acquire(blocking=False):
            try:
                self._probe_locked(force=False)
            finally:
                self._probe_lock.release()
        return self._state.read_only

    def _probe_locked(self, *, force: bool) -> None:
        state = self._state
        now = self._clock()
        if not (force or self._suspect or (state.read_only and now >= self._next_probe)):
            return  # another thread probed while we waited
        self._suspect = False
        self._next_probe = now + self._interval()
        if state.read_only and state.reason is Reason.ANNOUNCEMENT:
            return
        if not self._can_probe():
            if state.read_only and not force:
                self._transition(False, Reason.EXPIRED, "no probe available; assuming writable again")
            return
        generation = self._generation
        started = time.perf_counter()
        try:
            if self._probe is not None:
                read_only = bool(self._probe())
            else:
                read_only = probe_engine(self._engine, timeout=self.probe_timeout)
        except Exception as exc:
            logger.debug("read-only probe failed: %s", exc)
            self._timed(time.perf_counter() - started, "error")
            if not state.read_only:
                # Whatever kept the probe from an answer (the database gone, a pool timeout, the
                # probe's own time limit, a bug) says nothing of read-only: users are told the
                # database cannot be reached, whatever the exception would classify as.
                detail = f"database unreachable: {first_line(exc)}"
                self._transition(True, Reason.PROBE, detail, Failure.UNAVAILABLE, generation=generation)
            return
        self._timed(time.perf_counter() - started, "read_only" if read_only else "writable")
        # Also when it was unreachable and now answers as a standby: users must hear "read-only"
        # (refresh later), not "unavailable", for as long as the read-only failover lasts.
        if read_only != state.read_only or (read_only and state.failure is Failure.UNAVAILABLE):
            detail = "the database refuses writes" if read_only else "the database takes writes"
            self._transition(read_only, Reason.PROBE, detail, None, generation=generation)

    def _check_announcement(self, now: float, *, force: bool = False) -> None:
        watcher = self._watcher
        if watcher is None or not self._announce_lock.acquire(blocking=False):
            return
        try:
            if not force and now < self._announce_due:
                return
            due = now + self._interval()
            changed = watcher.refresh()
            announcement = watcher.current
            wall = self._wall()
            if announcement is not None:
                for edge in (announcement.starts, announcement.ends):
                    if edge is not None and edge.timestamp() > wall:
                        due = min(due, now + edge.timestamp() - wall)
            self._announce_due = due
            if changed:
                self._announce(announcement)
            in_effect = announcement is not None and announcement.in_effect(wall)
            state = self._state
            if in_effect and announcement is not None and state.reason is not Reason.ANNOUNCEMENT:
                self._transition(True, Reason.ANNOUNCEMENT, announcement.message, None)
            elif not in_effect and state.read_only and state.reason is Reason.ANNOUNCEMENT:
                self._transition(False, Reason.ANNOUNCEMENT, "the maintenance announcement ended")
                self._suspect = self._can_probe()  # the database itself may still be read-only
        finally:
            self._announce_lock.release()

    def _announce(self, announcement: Announcement | None) -> None:
        if announcement is None:
            logger.warning("maintenance announcement withdrawn")
        else:
            logger.warning(
                "maintenance announced (starts %s, ends %s): %s",
                announcement.starts or "now", announcement.ends or "when withdrawn",
                announcement.message,
            )
        self._notify("announcement", self._state)

    def _transition(
        self,
        read_only: bool,
        reason: Reason,
        detail: str,
        failure: Failure | None = None,
        *,
        generation: int | None = None,
    ) -> None:
        with self._lock:
            old = self._state
            if generation is not None and generation != self._generation:
                return  # something newer than this probe's question already decided
            if old.read_only == read_only and (not read_only or (old.reason, old.failure) == (reason, failure)):
                return
            if read_only and not old.read_only:
                self._next_probe = self._clock() + self._interval()
            self._generation += 1
            since = old.since if old.read_only == read_only else self._wall()
            new = MonitorState(read_only, since, reason, detail, failure)
            self._state = new
        if read_only and (not old.read_only or old.failure != failure):
            logger.warning("database is read-only (%s): %s", reason, detail)
        elif not read_only and old.read_only:
            logger.warning(
                "database is writable again after %.1f s (%s): %s",
                new.since - old.since, reason, detail,
            )
        self._notify("read-only" if read_only else "writable", new)

    def _notify(self, kind: str, state: MonitorState) -> None:
        event: MonitorEvent = {
            "event": kind,
            "read_only": state.read_only,
            "since": state.since,
            "reason": state.reason,
            "detail": state.detail,
            "failure": state.failure,
            "announcement": self.announcement,
        }
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("read-only monitor listener %r failed", listener)

    def __repr__(self) -> str:
        state = self._state
        mode = "read-only" if state.read_only else "writable"
        return f"<ReadOnlyMonitor {mode} since {state.since:.0f} ({state.reason}: {state.detail})>"


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() time would stay held forever in the child.
    for monitor in list(_monitors):
        monitor._init_locks()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

"""``SharedState``: every process of every service learns a read-only change together, through Redis.

Each process has its own :class:`~srht_readonly.monitor.ReadOnlyMonitor`, which learns that the
database became read-only from its own first failed write (or probe). With a ``SharedState``
attached, the first process to learn it tells the others:

* **publishing**: on a change of its monitor (read-only or writable, and the kind of failure),
  the process ``SET``s ``<prefix>:state`` (JSON, with an expiry of ``ttl`` seconds) and
  ``PUBLISH``es the same JSON on ``<prefix>:changes``. Only changes the process found itself are
  published (never one learned from a hint), and only when they differ from the last state
  seen on the channel, so a failover makes a handful of messages, not one per process;
* **subscribing**: a daemon thread per process listens on the channel (and reads the key at
  every (re)connection, so a process started during a read-only window starts read-only). A
  **read-only** hint turns the monitor read-only at once (``Reason.SHARED``, with the other
  process's detail); a **writable** hint makes the monitor probe the database at once (it turns
  writable only if the database agrees; see ``ReadOnlyMonitor.hint``).

Redis is a hint, never the authority. A hint is re-verified by each process's own recheck (a
probe at most ``recheck`` seconds later; with no probe the read-only state expires); the key
expires after ``ttl`` seconds; a writable hint is checked before it is believed. Without Redis,
or with Redis down, everything works as without ``SharedState``: publishing and subscribing
happen in two daemon threads, never in a request; their errors are logged (once per outage),
never raised; the subscriber reconnects with jittered exponential backoff; a change that could
not be published is sent when Redis is back if it is still the latest one and younger than
``ttl``. ``monitor.read_only`` stays a field read: nothing is added to the healthy path.

A process that forks (gunicorn with ``--preload``, a Celery prefork pool) gets new threads and
connections in the child, under a new origin. The threads never import a module once started:
what they would import lazily (the hostname codec, redis-py's version lookup) is imported by
``start()`` in the calling thread. CPython does not release, in a forked child, the lock of a
module another thread was importing at ``fork()`` time: a gunicorn worker forked while our
subscriber was importing ``encodings.idna`` hung forever on its first request (werkzeug needs
that codec too). ``tests/test_shared_state.py`` checks that the threads import nothing.

Needs ``redis`` (redis-py 4.5 or later: the ``flask`` extra).
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .errors import Failure
from .monitor import MonitorEvent, ReadOnlyMonitor, Reason

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TTL", "Hint", "SharedState", "shared_state_of"]

logger = logging.getLogger(__name__)

#: The default key prefix: ``srht-readonly:state`` and channel ``srht-readonly:changes``. Every
#: service on one database cluster must use the same prefix; clusters must not share one.
DEFAULT_PREFIX = "srht-readonly"
#: Seconds the published state lives in Redis (``SET ... EX``).
DEFAULT_TTL = 30.0

_started: weakref.WeakSet[SharedState] = weakref.WeakSet()
# What a forked child inherited from its parent's threads: kept referenced and never used, closed
# or collected there (a lock of theirs may have been held by a thread that does not exist in the
# child, and a Redis client's ``__del__`` takes its pool's locks).
_inherited: list[Any] = []
_by_monitor: weakref.WeakKeyDictionary[ReadOnlyMonitor, SharedState] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Hint:
    """One published state: what a process found, when (epoch seconds), and who it is (``origin``)."""

    read_only: bool
    failure: Failure | None
    detail: str
    origin: str
    at: float

    def dumps(self) -> str:
        doc = asdict(self)
        doc["failure"] = self.failure.value if self.failure is not None else None
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Hint:
        """Parse a published hint; ``ValueError`` if it is not one."""
        try:
            doc = json.loads(raw)
            failure = Failure(doc["failure"]) if doc.get("failure") is not None else None
            return cls(bool(doc["read_only"]), failure, str(doc["detail"]), str(doc["origin"]), float(doc["at"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a srht-readonly hint: {raw!r:.200}") from exc

    @property
    def verdict(self) -> tuple[bool, Failure | None]:
        return (self.read_only, self.failure)


def shared_state_of(monitor: ReadOnlyMonitor) -> SharedState | None:
    """The ``SharedState`` attached to ``monitor``, if any."""
    return _by_monitor.get(monitor)


class SharedState:
    """Shares ``monitor``'s state with every process using the same Redis and ``prefix``.

    ``url`` is a Redis URL (``redis://host:6379/0``); ``client`` a ``redis.Redis`` to use
    instead. ``timeout`` bounds every Redis command and connection attempt (seconds); the
    subscriber's reconnections wait from ``backoff[0]`` doubling to ``backoff[1]`` seconds,
    jittered. Nothing happens until :meth:`start`; :meth:`stop` ends the threads. One per
    monitor: :meth:`attach` returns the existing one.
    """

    def __init__(
        self,
        monitor: ReadOnlyMonitor,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        timeout: float = 0.5,
        backoff: tuple[float, float] = (0.1, 5.0),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("give either a Redis url or a client")
        if ttl <= 0 or timeout <= 0:
            raise ValueError("ttl and timeout must be positive numbers of seconds")
        self.monitor = monitor
        self.url = url
        self.prefix = prefix
        self.key = f"{prefix}:state"
        self.channel = f"{prefix}:changes"
        self.ttl = ttl
        self.timeout = timeout
        self.backoff = backoff
        self._wall = wall_clock
        self._given_client = client
        self._forked = False
        #: Counters, for tests and metrics: hints published, received from others, applied.
        self.published = 0
        self.received = 0
        self._init_process()

    def _init_process(self) -> None:
        """What each process has of its own (again in a child after ``fork()``)."""
        self.origin = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pending: Hint | None = None
        self._last_shared: tuple[bool, Failure | None] | None = None
        self._client: Any = None
        self._pubsub: Any = None
        self._threads: list[threading.Thread] = []
        self._outage = False
        self.connected = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    def attach(cls, monitor: ReadOnlyMonitor, url: str, **options: Any) -> SharedState:
        """The started ``SharedState`` of ``monitor``: the one already attached, or a new one."""
        existing = _by_monitor.get(monitor)
        if existing is not None:
            if (existing.url, existing.prefix) != (url, options.get("prefix", DEFAULT_PREFIX)):
                raise ValueError("this monitor already shares its state elsewhere (another Redis or prefix)")
            return existing
        return cls(monitor, url, **options).start()

    def start(self) -> SharedState:
        """Listen to the monitor and start the two threads; returns self. Never blocks on Redis."""
        if self._threads:
            return self
        current = _by_monitor.get(self.monitor)
        if current is not None and current is not self:
            raise ValueError("this monitor already has a SharedState")
        _by_monitor[self.monitor] = self
        self.monitor.add_listener(self._on_change)
        self._start_threads()
        _started.add(self)
        return self

    def _start_threads(self) -> None:
        self._stopping.clear()
        _import_ahead()
        self._client = self._make_client()
        for name, target in (("subscriber", self._subscribe_loop), ("publisher", self._publish_loop)):
            thread = threading.Thread(target=target, name=f"srht-readonly-shared-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop listening and end the threads (waiting at most ``timeout`` seconds)."""
        self.monitor.remove_listener(self._on_change)
        if _by_monitor.get(self.monitor) is self:
            del _by_monitor[self.monitor]
        _started.discard(self)
        self._stopping.set()
        self._wake.set()
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception as exc:
                logger.debug("closing the subscription failed: %s", exc)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = []
        if (self._given_client is None or self._forked) and self._client is not None:
            try:
                self._client.close()
            except Exception as exc:
                logger.debug("closing the Redis client failed: %s", exc)
        self.connected.clear()

    def _make_client(self) -> Any:
        import redis

        given = self._given_client
        if given is not None:
            if self._forked:  # a new pool with the given one's settings: never the parent's locks
                pool = given.connection_pool
                return redis.Redis(connection_pool=type(pool)(connection_class=pool.connection_class,
                                                              **pool.connection_kwargs))
            return given

        assert self.url is not None
        return redis.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            health_check_interval=max(1, int(self.ttl // 3)),
        )

    # -- publishing -----------------------------------------------------------------------

    def _on_change(self, event: MonitorEvent) -> None:
        """The monitor's listener: queue a hint for a change this process found itself."""
        if event["event"] not in ("read-only", "writable") or event["reason"] is Reason.SHARED:
            return
        # Two verdicts only: refusing writes, or unreachable (``READ_ONLY`` is the same as none).
        unreachable = event["read_only"] and event["failure"] is Failure.UNAVAILABLE
        verdict = (event["read_only"], Failure.UNAVAILABLE if unreachable else None)
        with self._lock:
            if verdict == self._last_shared:
                return  # the others were already told (or told us)
            self._last_shared = verdict
            self._pending = Hint(verdict[0], verdict[1], event["detail"], self.origin, self._wall())
        self._wake.set()

    def _publish_loop(self) -> None:
        delay = self.backoff[0]
        while not self._stopping.is_set():
            self._wake.wait()
            with self._lock:
                hint = self._pending
                self._wake.clear()
            if hint is None or self._stopping.is_set():
                continue
            if self._wall() - hint.at > self.ttl:
                with self._lock:
                    if self._pending is hint:
                        self._pending = None
                continue  # too old to be worth telling
            try:
                self._send(hint)
            except Exception as exc:
                self._lost(exc, "publish")
                self._stopping.wait(self._jittered(delay))
                delay = min(delay * 2, self.backoff[1])
                self._wake.set()  # try again: it may still be the latest change
                continue
            delay = self.backoff[0]
            with self._lock:
                if self._pending is hint:
                    self._pending = None

    def _send(self, hint: Hint) -> None:
        raw = hint.dumps()
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self.key, raw, px=int(self.ttl * 1000))
        pipe.publish(self.channel, raw)
        pipe.execute()
        self.published += 1
        logger.info("told the other processes: database %s (%s)",
                    "read-only" if hint.read_only else "writable", hint.detail)

    # -- subscribing ----------------------------------------------------------------------

    def _subscribe_loop(self) -> None:
        delay = self.backoff[0]
        while not self._stopping.is_set():
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                self._pubsub = pubsub
                try:
                    pubsub.subscribe(self.channel)
                    current = self._client.get(self.key)  # after subscribing: no change falls in between
                    self._connected()
                    delay = self.backoff[0]
                    if current is not None:
                        self._receive(current)
                    while not self._stopping.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self._receive(message["data"])
                finally:
                    self._pubsub = None
                    pubsub.close()
            except Exception as exc:
                self.connected.clear()
                if self._stopping.is_set():
                    return
                self._lost(exc, "subscription")
                self._stopping.wait(self._jittered(delay))
                delay = min(delay * 2, self.backoff[1])

    def _receive(self, raw: str | bytes) -> None:
        try:
            hint = Hint.loads(raw)
        except ValueError as exc:
            logger.warning("%s", exc)
            return
        with self._lock:
            self._last_shared = hint.verdict
        if hint.origin == self.origin or self._wall() - hint.at > self.ttl:
            return
        self.received += 1
        detail = f"{hint.detail} (told by {hint.origin.rsplit(':', 1)[0]})"
        try:
            self.monitor.hint(hint.read_only, detail, hint.failure)
        except Exception:  # a listener or a probe gone wrong must not end the subscription
            logger.exception("applying a shared read-only hint failed")

    # -- helpers --------------------------------------------------------------------------

    def _connected(self) -> None:
        self.connected.set()
        if self._outage:
            self._outage = False
            logger.warning("shared read-only state: connected to Redis again")

    def _lost(self, exc: Exception, what: str) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("shared read-only state: Redis %s failed (%s); each process relies on its own "
                           "monitor until it is back", what, exc)
        else:
            logger.debug("shared read-only state: Redis %s failed again: %s", what, exc)

    @staticmethod
    def _jittered(delay: float) -> float:
        return delay * (0.5 + random.random() / 2)

    def _restart_after_fork(self) -> None:
        _inherited.append((self._client, self._pubsub, self._threads, self._lock))
        self._forked = True
        self._init_process()
        _by_monitor[self.monitor] = self
        self._start_threads()

    def __repr__(self) -> str:
        state = "connected" if self.connected.is_set() else "not connected"
        return f"<SharedState {self.prefix} via {self.url or self._given_client!r}, {state}>"


def _import_ahead() -> None:
    """Import now, in the calling thread, what the threads would otherwise import on first use."""
    "localhost".encode("idna")  # getaddrinfo() encodes the host: encodings.idna, stringprep, unicodedata
    try:
        from redis.utils import get_lib_version

        get_lib_version()  # CLIENT SETINFO on connect: importlib.metadata, email.parser
    except Exception:  # an older redis-py: nothing to import ahead
        logger.debug("no redis-py version lookup to import ahead", exc_info=True)


def _after_fork_in_child() -> None:
    # Threads do not survive fork(): give every started SharedState new ones (and a new origin).
    for shared in list(_started):
        try:
            shared._restart_after_fork()
        except Exception:
            logger.exception("restarting the shared read-only state after fork() failed")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

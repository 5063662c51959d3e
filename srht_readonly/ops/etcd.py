"""The fleet in etcd: the fleet-wide operator lock, and each agent's heartbeat.

Two operators on two machines cannot both change the fleet (``FleetLock``); every agent
(``ops.agent``) says, every second, where its PgBouncer points and what it sees
(``Heartbeat``), which ``status`` shows (``agents``, ``health``).

The lock file (``ops.lock``) serialises the operators of *one* machine. With an inventory
``[etcd]`` section, every changing command also takes ``FleetLock``: a key
``PREFIX/lock`` created only if absent (one etcd transaction), attached to a lease of
``lock-ttl`` seconds that a thread keeps alive while the command runs. The key holds who holds
it (user, host, pid, command, since), for the refusal message. The command releases it by
revoking the lease; a holder that dies (``kill -9``, a lost machine) stops keeping it alive, so
etcd drops the key ``lock-ttl`` seconds later and nobody has to clean up.

When etcd cannot be reached (no endpoint answers, or the cluster has lost its quorum and cannot
commit), the command is refused: nothing changed. Proceeding without the lock is exactly what it
exists to prevent.

The client is ``etcd3gw`` (the ``etcd`` extra), over etcd's v3 JSON gateway: plain HTTP, which
etcd 3.4 serves on its client port, no gRPC stack to install. Endpoints are tried in the
inventory's order; the first that answers is used.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

from .errors import Refused
from .inventory import EtcdSpec
from .lock import _user

logger = logging.getLogger(__name__)

__all__ = ["FleetLock", "Heartbeat", "agents", "client", "health"]

#: Seconds one request to an endpoint may take.
REQUEST_TIMEOUT = 3.0
#: Seconds an agent's heartbeat outlives its last beat (it beats every second).
HEARTBEAT_TTL = 5


def why(exc: BaseException) -> str:
    """An etcd3gw exception as text (its connection and timeout errors keep theirs in ``detail_text``)."""
    return str(exc).strip() or str(getattr(exc, "detail_text", "") or "").strip()[:300] or type(exc).__name__


def client(spec: EtcdSpec, *, endpoints: tuple[str, ...] | None = None, timeout: float = REQUEST_TIMEOUT) -> Any:
    """An ``etcd3gw`` client of the first of ``endpoints`` (default: the inventory's) that answers;
    ``Refused`` naming each failure."""
    try:
        import etcd3gw
        from etcd3gw import exceptions
    except ImportError as exc:
        raise Refused(f"the inventory has [etcd] but etcd3gw is not installed: pip install 'srht-readonly[etcd]' "
                      f"({exc}); nothing was changed") from exc
    failures = []
    for endpoint in endpoints or spec.endpoints:
        scheme, _, rest = endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        candidate = etcd3gw.Etcd3Client(host=host.strip("[]"), port=int(port), protocol=scheme, timeout=timeout,
                                        api_path="/v3/")
        try:
            candidate.status()
            return candidate
        except (exceptions.Etcd3Exception, OSError) as exc:
            failures.append(f"{endpoint}: {why(exc)}")
    raise Refused("cannot reach etcd for the fleet lock; nothing was changed (" + "; ".join(failures) + ")")


class FleetLock:
    """``with FleetLock(spec, "switchover --to konpaku"):`` or ``Refused`` naming the holder.

    While held, a thread refreshes the lease four times per ttl, each request bounded to a quarter
    of it, moving to another endpoint when one fails. If the lease expires all the same (etcd
    unreachable for a whole ttl), the lock is **lost**: ``lost`` is set and an error is logged
    (stderr), because another operator may now proceed; the command is not stopped half-way
    (a procedure interrupted between two steps is worse), and its result says so
    (``release`` logs it again).
    """

    def __init__(self, spec: EtcdSpec, command: str) -> None:
        self.spec = spec
        self.command = command
        self.key = f"{spec.prefix}/lock"
        self.lost: str | None = None  # why the lock was lost while held, or None
        self._lease: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FleetLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the key on a new lease, or ``Refused`` naming who holds it (or why etcd said no).
        Whatever fails, the lease taken for it is revoked (with it, a key a timed-out request did create)."""
        from etcd3gw import exceptions

        etcd = client(self.spec, timeout=min(REQUEST_TIMEOUT, self.spec.lock_ttl / 4))
        holder = {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        lease = None
        try:
            lease = etcd.lease(self.spec.lock_ttl)
            created = etcd.create(self.key, json.dumps(holder), lease=lease)
            held_by = None if created else _describe(etcd.get(self.key))
        except (exceptions.Etcd3Exception, OSError) as exc:
            _revoke(lease)
            raise Refused(f"etcd did not grant the fleet lock ({why(exc)}): a cluster without its quorum cannot; "
                          f"nothing was changed") from exc
        except BaseException:
            _revoke(lease)
            raise
        if held_by is not None:
            _revoke(lease)
            raise Refused(f"another operator holds the fleet lock in etcd: {held_by}; nothing was changed. Wait for "
                          f"it to finish and check `srht-readonly status` before trying again (key {self.key}; "
                          f"released {self.spec.lock_ttl} s after its holder dies)")
        self._lease = lease
        self._thread = threading.Thread(target=self._keep, name="srht-readonly-fleet-lock", daemon=True)
        self._thread.start()
        logger.info("fleet lock %s taken (lease %s, ttl %d s)", self.key, lease.id, self.spec.lock_ttl)

    def acquire_and_release(self) -> None:
        """Take the lock and give it back at once: ``Refused`` while someone else holds it."""
        self.acquire()
        self.release()

    def release(self) -> None:
        if self._lease is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.spec.lock_ttl)
        if self.lost:
            logger.error("the fleet lock %s was lost while `%s` ran (%s): another operator may have acted meanwhile; "
                         "check `srht-readonly status`", self.key, self.command, self.lost)
        else:
            _revoke(self._lease, warn=f"could not release the fleet lock {self.key}; etcd drops it within "
                                      f"{self.spec.lock_ttl} s")
        self._lease = None

    def _keep(self) -> None:
        """Refresh the lease every quarter of its ttl (each request bounded to that), from another endpoint
        when the one in use fails; an expired lease is a lost lock."""
        from etcd3gw.lease import Lease

        step = self.spec.lock_ttl / 4
        lease, last_ok = self._lease, time.monotonic()
        while not self._stop.wait(step):
            try:
                ttl = lease.refresh()
            except Exception as exc:  # noqa: BLE001 - that endpoint failed: try the others next time
                logger.warning("could not keep the fleet lock %s alive: %s", self.key, why(exc))
                try:
                    lease = Lease(lease.id, client(self.spec, timeout=step))
                except Refused as unreachable:
                    logger.warning("%s", unreachable)
                ttl = None
            if ttl is not None and ttl > 0:
                last_ok = time.monotonic()
            elif ttl is not None or time.monotonic() - last_ok > self.spec.lock_ttl:
                self.lost = ("etcd says its lease expired" if ttl is not None else
                             f"not refreshed for {time.monotonic() - last_ok:.1f} s, over its ttl")
                logger.error("LOST the fleet lock %s while `%s` runs: %s; another operator may now proceed",
                             self.key, self.command, self.lost)
                return


def _revoke(lease: Any, *, warn: str | None = None) -> None:
    if lease is None:
        return
    try:
        lease.revoke()
    except Exception as exc:  # noqa: BLE001 - the lease expires by itself
        if warn:
            logger.warning("%s: %s", warn, why(exc))


def _describe(values: list[Any]) -> str:
    try:
        h = json.loads(values[0])
        return (f"`{h.get('command', '?')}` by {h.get('user', '?')} on {h.get('host', '?')} (pid {h.get('pid', '?')}, "
                f"since {h.get('since', '?')})")
    except (IndexError, ValueError, TypeError, AttributeError):
        return "someone (the key has no readable holder)"




class Heartbeat:
    """An agent's state under ``PREFIX/agents/NAME``, on a lease of ``HEARTBEAT_TTL`` s renewed at each
    publication: when the agent stops (or dies, or loses etcd) the key goes with the lease.

    ``beat(state)`` only hands the state to a thread of its own, which publishes the latest one: an
    agent's decisions never wait for etcd (an endpoint behind a black hole takes ``REQUEST_TIMEOUT``
    to fail). A failure is logged once, then retried with the next state."""

    def __init__(self, spec: EtcdSpec, name: str, *, ttl: int = HEARTBEAT_TTL) -> None:
        self.spec, self.ttl = spec, ttl
        self.key = f"{spec.prefix}/agents/{name}"
        self._client: Any = None
        self._lease: Any = None
        self._failing: str | None = None
        self._next: dict[str, Any] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.published = 0  # how many states etcd took
        self._since: float | None = None  # when etcd last took one (monotonic), or the first was handed over
        self._first = 0  # the endpoint tried first

    def silent_for(self) -> float:
        """Seconds since etcd last took a heartbeat (or, none taken yet, since the first was handed over):
        a put needs the cluster's quorum, so this is how long this agent has not seen one."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    @property
    def failing(self) -> str | None:
        """The last publication's error, or None when it went through."""
        return self._failing

    def beat(self, state: dict[str, Any]) -> None:
        """Publish ``state`` (plus ``time``) soon, replacing one not yet published; returns at once."""
        with self._cond:
            if self._since is None:
                self._since = time.monotonic()
            self._next = {**state, "time": time.time()}
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="srht-readonly-heartbeat", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._next is None and not self._closed:
                    self._cond.wait()
                if self._closed or self._next is None:
                    return
                state, self._next = self._next, None
            self._publish(state)

    def _publish(self, state: dict[str, Any]) -> None:
        try:
            if self._client is None:  # after a failure, from the next endpoint on: the one that failed may
                n = len(self.spec.endpoints)  # still answer while cut off from its cluster's majority
                self._client = client(self.spec, endpoints=self.spec.endpoints[self._first % n:]
                                      + self.spec.endpoints[:self._first % n])
            if self._lease is None or self._lease.refresh() <= 0:  # none yet, or expired while etcd was away
                self._lease = self._client.lease(self.ttl)
            self._client.put(self.key, json.dumps(state), lease=self._lease)
        except Exception as exc:  # noqa: BLE001 - unreachable, no quorum: the agent carries on without
            self._client = self._lease = None
            self._first += 1
            if str(exc) != self._failing:
                self._failing = str(exc)
                logger.warning("agent heartbeat to etcd failed (retrying): %s", exc)
            return
        self._failing = None
        self._since = time.monotonic()
        self.published += 1

    def close(self) -> None:
        """Stop publishing and withdraw the heartbeat at once (a clean stop)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=2 * REQUEST_TIMEOUT)
        if self._lease is not None and (self._thread is None or not self._thread.is_alive()):
            try:
                self._lease.revoke()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                logger.info("could not withdraw the heartbeat %s: %s", self.key, exc)
            self._lease = None


def agents(spec: EtcdSpec, *, endpoints: tuple[str, ...] | None = None, etcd: Any = None) -> dict[str, dict[str, Any]]:
    """Every agent's last heartbeat, by PgBouncer name, with ``age`` (seconds since it beat, by this
    machine's clock; a heartbeat is gone ``HEARTBEAT_TTL`` s after its agent stopped beating);
    ``Refused`` when etcd cannot be read."""
    from etcd3gw import exceptions

    etcd = etcd or client(spec, endpoints=endpoints)  # a caller that polls passes its own client
    prefix = f"{spec.prefix}/agents/"
    try:
        values = etcd.get_prefix(prefix)
    except (exceptions.Etcd3Exception, OSError) as exc:
        raise Refused(f"cannot read the agents' heartbeats from etcd: {why(exc)}") from exc
    out: dict[str, dict[str, Any]] = {}
    now = time.time()
    for value, meta in values:
        name = meta["key"].decode() if isinstance(meta["key"], bytes) else str(meta["key"])
        try:
            state = json.loads(value)
        except ValueError:
            continue
        state["age"] = round(now - float(state.get("time", now)), 1)
        out[name[len(prefix):]] = state
    return out


def health(spec: EtcdSpec, *, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Each endpoint, asked at the same time (at most ``timeout`` s): ``{"endpoint", "answers", "healthy",
    "error"}``; ``healthy``: it has a leader and the cluster can commit (etcd's own ``/health``)."""
    import concurrent.futures

    import requests

    def ask(endpoint: str) -> dict[str, Any]:
        try:
            resp = requests.get(f"{endpoint}/health", timeout=timeout)
            healthy = resp.ok and str(resp.json().get("health")) == "true"
            return {"endpoint": endpoint, "answers": True, "healthy": healthy,
                    "error": None if healthy else f"HTTP {resp.status_code}: {resp.text.strip()[:200]}"}
        except (requests.RequestException, ValueError) as exc:
            return {"endpoint": endpoint, "answers": False, "healthy": False, "error": str(exc)[:200]}

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(spec.endpoints)) as pool:
        return list(pool.map(ask, spec.endpoints))

"""``agent --auto-promote AFTER``: a promotion without an operator, made safely or not at all.

A read-only failover cannot split data; a promotion can (two primaries, each taking writes the
other never sees). So an agent started with ``--auto-promote AFTER`` promotes the standby only
when every one of these holds, checked in this order each time:

1. its own PgBouncer is on the standby because the primary stopped answering (``away``), it is
   not hands off nor frozen (etcd takes its heartbeats), and its own probe of the primary does
   not answer now;
2. it holds the fleet's promotion lease (``Leadership``): the key ``PREFIX/leader``, created
   only if absent on a lease of ``LEADER_TTL`` seconds that its holder refreshes every second,
   and sought only while condition 1 holds (an agent that could not promote gives it back). One
   agent at a time may promote; the lease counts as held only while refreshed within the last
   half of its ttl, so a holder cut off from etcd stops counting itself leader well before
   another can take over;
3. a majority of the PgBouncers (more than half of those in the inventory and of any other whose
   agent beats; an agent that does not beat counts as one that did not see the primary die) say,
   in a heartbeat under ``HEARTBEAT_FRESH`` seconds old, that the primary has not answered them
   for ``AFTER`` seconds (``votes``). One host cut off from the primary is never a majority
   (unless it is the only PgBouncer);
4. the standby answers as a standby and has received WAL up to within ``[agent] max-lag`` of the
   furthest position the leader or any voter saw the primary write;
5. the fleet lock (``etcd.FleetLock``) is free: an operator's command under way decides, not
   the agent; it is held through the fence and the promotion;
6. the old primary is **fenced**: the ``[agent] fence`` command (``$SRHT_READONLY_FENCE_NODE``
   names the node) exits 0 within ``fence-timeout`` (its whole process group is killed past
   that). If it fails, nothing is promoted: the agent logs it and tries again ``FENCE_RETRY``
   seconds later;
7. ``check_promote``, the operator's own check, agrees: among others, it refuses while the old
   primary's postmaster still runs (looked at over the node's ``ssh =``, or on this machine),
   whatever the fence command said.

Then ``run_promote`` (as ``srht-readonly promote`` does), and the fleet's desired state
(``ops.desired``) records the new primary, its timeline, and every PgBouncer on it. Every agent
(this one included) then sees the standby answer as a primary, and the new generation, and
adopts it (``follow`` for one whose PgBouncer had stayed on the old primary). The old primary
stays stopped until an operator rejoins it (``srht-readonly demote``). Whatever
fails on the way (etcd, a query, ssh) is logged and tried again later; it never ends the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .cluster import Cluster
from .desired import publish
from .errors import OpsError, Refused
from .etcd import REQUEST_TIMEOUT, FleetLock, agents, client, why
from .inventory import AgentSpec, EtcdSpec
from .promote import check_promote, run_promote

logger = logging.getLogger(__name__)

__all__ = ["AutoPromoter", "Candidate", "Leadership", "votes"]

#: Seconds the promotion lease outlives a holder that stopped refreshing it.
LEADER_TTL = 5
#: A heartbeat older than this does not vote (agents beat every second).
HEARTBEAT_FRESH = 2.0
#: Seconds between two tries of a fence command that failed.
FENCE_RETRY = 10.0
#: Seconds between two looks at the votes (each one reads every heartbeat from etcd).
LOOK_EVERY = 0.5


class Leadership:
    """Holds ``PREFIX/leader`` for ``name`` while it is wanted and nobody else holds it; ``held()`` says
    whether it does now.

    A thread tries every second to create the key (on a lease of ``ttl`` s) while ``want(True)`` and
    the key is free, and refreshes the lease while held; after ``want(False)`` it gives the lease back,
    so an agent that cannot promote (not away, hands off, frozen) never keeps the others from it."""

    def __init__(self, spec: EtcdSpec, name: str, *, ttl: int = LEADER_TTL) -> None:
        self.spec, self.name, self.ttl = spec, name, ttl
        self.key = f"{spec.prefix}/leader"
        self._lease: Any = None
        self._ok_at: float | None = None  # when etcd last confirmed the lease (monotonic)
        self._wanted = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="srht-readonly-leader", daemon=True)
        self._first = 0  # the endpoint to try first: the next one after a failure
        self.holder: str | None = None  # who holds it, as last read

    def start(self) -> Leadership:
        self._thread.start()
        return self

    def want(self, wanted: bool) -> None:
        self._wanted = wanted

    def held(self) -> bool:
        return self._ok_at is not None and time.monotonic() - self._ok_at < self.ttl / 2

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted:
                self._release()
            else:
                try:
                    self._hold()
                except Exception as exc:  # noqa: BLE001 - unreachable, no quorum: not the leader until it answers
                    logger.info("promotion lease: %s", why(exc))
                    self._ok_at = None
                    self._first += 1  # that endpoint failed: start from the next one
            self._stop.wait(1.0)

    def endpoints(self) -> tuple[str, ...]:
        """The inventory's endpoints, from the one this lease last worked through (after a failure: the next)."""
        n = len(self.spec.endpoints)
        return self.spec.endpoints[self._first % n:] + self.spec.endpoints[:self._first % n]

    def _hold(self) -> None:
        etcd = client(self.spec, endpoints=self.endpoints(), timeout=min(REQUEST_TIMEOUT, self.ttl / 4))
        asked = time.monotonic()
        if self._lease is not None:
            from etcd3gw.lease import Lease

            lease = Lease(self._lease.id, etcd)  # through the endpoint that answers now, revoked through it too
            if lease.refresh() > 0:
                self._lease, self._ok_at = lease, asked
                return
            self._lease = None  # expired: try to create the key again
        lease = etcd.lease(self.ttl)
        try:
            created = etcd.create(self.key, self.name, lease=lease)
        except BaseException:  # it may have been created all the same: the lease goes, and the key with it
            with contextlib.suppress(Exception):
                lease.revoke()
            raise
        if created:
            self._lease, self._ok_at, self.holder = lease, asked, self.name
            logger.info("promotion lease %s taken by %s", self.key, self.name)
            return
        lease.revoke()
        self._ok_at = None
        values = etcd.get(self.key)
        self.holder = (values[0].decode() if isinstance(values[0], bytes) else str(values[0])) if values else None

    def _release(self) -> None:
        lease, self._lease, self._ok_at = self._lease, None, None
        if lease is not None:
            try:
                lease.revoke()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                logger.info("could not give the promotion lease back: %s", why(exc))

    def stop(self) -> None:
        """Stop and give the lease back (another agent may take it at once)."""
        self._stop.set()
        self._thread.join(timeout=len(self.spec.endpoints) * REQUEST_TIMEOUT + 5)
        self._release()


def votes(beats: Mapping[str, Mapping[str, Any]], pgbouncers: list[str], primary: str,
          after: float) -> tuple[int, int, int | None]:
    """(how many agents say ``primary`` has not answered them for ``after`` s, how many make a majority,
    the furthest WAL position any of those agents saw ``primary`` write, or None).

    Counted: one agent per PgBouncer listed, in a heartbeat under ``HEARTBEAT_FRESH`` s old (by the
    reader's clock against the agent's: a cutoff only, never added to the silence), that expects
    ``primary`` (the same fleet view), with ``primary_silent_for`` at least ``after``. A PgBouncer
    without a fresh heartbeat counts against: the majority is of all of them."""
    dead, lsns = 0, []
    for name in pgbouncers:
        beat = beats.get(name)
        if not beat or float(beat.get("age", 1e9)) > HEARTBEAT_FRESH or beat.get("primary") != primary:
            continue
        silent = beat.get("primary_silent_for")
        if silent is not None and float(silent) >= after:
            dead += 1
            if beat.get("primary_lsn") is not None:
                lsns.append(int(beat["primary_lsn"]))
    return dead, len(pgbouncers) // 2 + 1, max(lsns) if lsns else None


@dataclass
class Candidate:
    """What the agent knows when it considers a promotion: the nodes, the standby's received WAL and the
    last WAL position it saw the primary write (bytes), or None when unknown, and whether its own probe
    of the primary answers now (then nothing is promoted, whatever the votes say)."""

    primary: str
    standby: str
    standby_lsn: int | None
    primary_lsn: int | None
    primary_answers: bool = False
    silent_for: float | None = None  # seconds since the primary last answered this agent's probes


class AutoPromoter:
    """``consider(candidate)`` from the agent's loop while its PgBouncer is away; promotes when it may.

    ``want(eligible)`` each step: the promotion lease is sought only while the agent could use it.
    ``say(action, message)`` records each decision (the agent's log and hooks). Nothing here raises:
    whatever fails is a ``no-promotion``, ``fence-failed`` or ``promote-failed`` line, tried again later."""

    def __init__(self, cluster: Cluster, name: str, after: float, say: Callable[[str, str], None]) -> None:
        inventory = cluster.inventory
        if inventory.etcd is None:
            raise OpsError("--auto-promote needs an [etcd] section in the inventory: the promotion lease and the "
                           "other agents' votes are kept there")
        if inventory.agent is None:
            raise OpsError("--auto-promote needs an [agent] section with fence = COMMAND: the old primary is "
                           "stopped for good before its standby is promoted, or nothing is promoted")
        self.cluster, self.name, self.after, self.say = cluster, name, after, say
        self.etcd: EtcdSpec = inventory.etcd
        self.spec: AgentSpec = inventory.agent
        self.leadership = Leadership(self.etcd, name).start()
        self._next_look = 0.0
        self._retry_at = 0.0
        self._said: str | None = None

    def want(self, eligible: bool) -> None:
        """Whether the agent could promote now (away, hands free, not frozen): only then is the lease sought."""
        self.leadership.want(eligible)
        if not eligible:
            self._said = None

    def close(self) -> None:
        self.leadership.stop()

    def consider(self, candidate: Candidate) -> bool:
        """Promote ``candidate.standby`` if every condition holds now; True when it did."""
        now = time.monotonic()
        if now < self._next_look or now < self._retry_at:
            return False
        self._next_look = now + LOOK_EVERY
        if candidate.primary_answers:
            return self._wait(f"{candidate.primary} answers this agent's probe again")
        if not self.leadership.held():
            return self._wait(f"not the promotion leader ({self.leadership.holder or 'nobody'} holds "
                              f"{self.leadership.key}): the leader decides")
        try:
            beats = dict(agents(self.etcd, endpoints=self.leadership.endpoints()))
        except Exception as exc:  # noqa: BLE001 - unreachable, no quorum
            return self._wait(f"cannot read the agents' heartbeats: {why(exc)}")
        # This agent's own vote from its probes now, not from its last heartbeat (which a slow etcd read
        # may have aged past HEARTBEAT_FRESH).
        beats[self.name] = {"primary": candidate.primary, "primary_silent_for": candidate.silent_for, "age": 0.0,
                            "primary_lsn": candidate.primary_lsn}
        # Every PgBouncer counts: the inventory's, and any other whose agent beats (an inventory that lacks
        # some must not shrink the majority).
        pgbouncers = sorted(set(self.cluster.inventory.pgbouncers) | set(beats))
        dead, needed, furthest = votes(beats, pgbouncers, candidate.primary, self.after)
        if dead < needed:
            return self._wait(f"{dead} of {len(pgbouncers)} agents have seen {candidate.primary} silent for "
                              f"{self.after:g} s; {needed} needed to promote")
        written = max((x for x in (candidate.primary_lsn, furthest) if x is not None), default=None)
        if candidate.standby_lsn is None or written is None:
            return self._wait(f"the WAL {candidate.standby} received, or the last {candidate.primary} wrote, is "
                              "unknown: cannot tell how much would be lost")
        lag = written - candidate.standby_lsn
        if lag > self.spec.max_lag:
            return self._wait(f"{candidate.standby} lacks {lag} bytes of WAL the primary was seen to write "
                              f"(max-lag {self.spec.max_lag}): promoting it would lose them")
        try:  # an operator's command holds the fleet lock: it decides, not the agent
            lock = FleetLock(self.etcd, f"agent {self.name}: fence {candidate.primary}, promote {candidate.standby}")
            lock.acquire()
        except Exception as exc:  # noqa: BLE001 - Refused (held, no quorum) or anything else: not now
            return self._wait(f"the fleet lock is not free ({why(exc)})")
        try:
            return self._fence_and_promote(candidate, dead, len(pgbouncers), max(lag, 0))
        finally:
            lock.release()

    def _fence_and_promote(self, candidate: Candidate, dead: int, of: int, lag: int) -> bool:
        self._said = None
        fenced = self._fence(candidate.primary)
        if fenced is not None:
            self._retry_at = time.monotonic() + FENCE_RETRY
            self.say("fence-failed", f"fencing {candidate.primary} failed ({fenced}): nothing promoted; trying "
                                     f"again in {FENCE_RETRY:g} s")
            return False
        if not self.leadership.held():  # the fence took a while: still the only one allowed?
            return self._wait("lost the promotion lease while fencing")
        try:
            plan = check_promote(self.cluster, candidate.standby)
            result = run_promote(self.cluster, plan)
        except Exception as exc:  # noqa: BLE001 - a refusal, a query or ssh that failed: nothing or all done
            self._retry_at = time.monotonic() + FENCE_RETRY
            self.say("promote-failed", f"promoting {candidate.standby} failed: {why(exc)}; trying again in "
                                       f"{FENCE_RETRY:g} s")
            return False
        warnings = "".join(f"; warning: {w}" for w in result.warnings)
        self.say("promote", f"{result.text()}; {dead} of {of} agents saw {candidate.primary} silent for "
                            f"{self.after:g} s, {candidate.primary} fenced, lag {lag} bytes{warnings}")
        self._record_state(candidate.standby, result.timeline_after)
        return True

    def _wait(self, why_not: str) -> bool:
        if why_not != self._said:
            self._said = why_not
            self.say("no-promotion", why_not)
        return False

    def _fence(self, node: str) -> str | None:
        """Run the fence command for ``node`` (in a process group of its own, all of it killed on timeout);
        None when it exited 0, else why not."""
        spec = self.cluster.inventory.node(node)
        env = {**os.environ, "SRHT_READONLY_FENCE_NODE": node, "SRHT_READONLY_FENCE_DATA": spec.data,
               "SRHT_READONLY_FENCE_SSH": spec.ssh or ""}
        # Its output to a file, not a pipe: a child it leaves behind (ssh -f, a daemon) must not keep the agent
        # waiting for the end of a pipe.
        with tempfile.TemporaryFile(mode="w+") as output:
            proc = subprocess.Popen(self.spec.fence, shell=True, env=env, stdout=output,  # noqa: S602
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=self.spec.fence_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                return f"no answer within fence-timeout = {self.spec.fence_timeout:g} s (killed)"
            output.seek(0)
            out = output.read()
        if proc.returncode != 0:
            return f"exit {proc.returncode}: {out.strip()[-300:] or 'no output'}"
        return None

    def _record_state(self, primary: str, timeline: int) -> None:
        """The fleet's desired state (``ops.desired``): ``primary`` on ``timeline``, every PgBouncer on it
        (best effort: the promotion is done, and every agent also adopts a standby it sees promoted)."""
        try:
            publish(self.etcd, f"agent {self.name} --auto-promote", primary=primary, timeline=timeline,
                    pgbouncers={name: primary for name in self.cluster.inventory.pgbouncers})
        except Refused as exc:
            logger.warning("could not record the new primary in etcd: %s", exc)

"""``agent --auto-promote AFTER``: a promotion without an operator, made safely or not at all.

A read-only failover cannot split data; a promotion can (two primaries, each taking writes the
other never sees). So an agent started with ``--auto-promote AFTER`` promotes the standby only
when every one of these holds, checked in this order each time:

1. its own PgBouncer is on the standby because the primary stopped answering (``away``) and
   etcd takes its heartbeats (not frozen);
2. it holds the fleet's promotion lease (``Leadership``): the key ``PREFIX/leader``, created
   only if absent on a lease of ``LEADER_TTL`` seconds that its holder refreshes every second.
   One agent at a time may promote; the lease counts as held only while refreshed within the
   last half of its ttl, so a holder cut off from etcd stops counting itself leader well before
   another can take over;
3. a majority of the PgBouncers (more than half of those in the inventory and of any other whose
   agent beats; an agent that does not beat counts as one that did not see the primary die) say, in a heartbeat under
   ``HEARTBEAT_FRESH`` seconds old, that the primary has not answered them for ``AFTER`` seconds
   (``votes``). One host cut off from the primary is never a majority;
4. the standby answers as a standby and has received WAL up to within ``[agent] max-lag`` of the
   last position the agent saw the primary write;
5. the old primary is **fenced**: the ``[agent] fence`` command (``$SRHT_READONLY_FENCE_NODE``
   names the node) exits 0 within ``fence-timeout``. If it fails, nothing is promoted: the agent
   logs it and tries again ``FENCE_RETRY`` seconds later;
6. ``check_promote``, the operator's own check, agrees: among others, it refuses while the old
   primary's postmaster still runs, whatever the fence command said.

Then ``run_promote`` (as ``srht-readonly promote`` does), and ``PREFIX/state`` records the new
primary and its timeline. Every agent (this one included) then sees the standby answer as a
primary and adopts it. The old primary stays stopped until an operator rejoins it
(``srht-readonly demote``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .cluster import Cluster
from .errors import OpsError
from .etcd import REQUEST_TIMEOUT, agents, client, why
from .inventory import AgentSpec, EtcdSpec
from .promote import check_promote, run_promote

logger = logging.getLogger(__name__)

__all__ = ["AutoPromoter", "Candidate", "Leadership", "votes"]

#: Seconds the promotion lease outlives a holder that stopped refreshing it.
LEADER_TTL = 5
#: A heartbeat older than this does not vote.
HEARTBEAT_FRESH = 3.0
#: Seconds between two tries of a fence command that failed.
FENCE_RETRY = 10.0
#: Seconds between two looks at the votes (each one reads every heartbeat from etcd).
LOOK_EVERY = 0.5


class Leadership:
    """Holds ``PREFIX/leader`` for ``name`` when nobody else does; ``held()`` says whether it does now.

    A thread tries to create the key (on a lease of ``ttl`` s) every second while it is not held,
    and refreshes the lease every second while it is."""

    def __init__(self, spec: EtcdSpec, name: str, *, ttl: int = LEADER_TTL) -> None:
        self.spec, self.name, self.ttl = spec, name, ttl
        self.key = f"{spec.prefix}/leader"
        self._lease: Any = None
        self._ok_at: float | None = None  # when etcd last confirmed the lease (monotonic)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="srht-readonly-leader", daemon=True)
        self.holder: str | None = None  # who holds it, as last read

    def start(self) -> Leadership:
        self._thread.start()
        return self

    def held(self) -> bool:
        return self._ok_at is not None and time.monotonic() - self._ok_at < self.ttl / 2

    def _run(self) -> None:
        etcd = None
        while not self._stop.is_set():
            try:
                if etcd is None:
                    etcd = client(self.spec, timeout=min(REQUEST_TIMEOUT, self.ttl / 4))
                asked = time.monotonic()
                if self._lease is not None and self._lease.refresh() > 0:
                    self._ok_at = asked
                else:
                    self._lease, self._ok_at = etcd.lease(self.ttl), None
                    if etcd.create(self.key, self.name, lease=self._lease):
                        self._ok_at = asked
                        logger.info("promotion lease %s taken by %s", self.key, self.name)
                    else:
                        self._lease.revoke()
                        self._lease = None
                        values = etcd.get(self.key)
                        self.holder = values[0].decode() if values and isinstance(values[0], bytes) else (
                            str(values[0]) if values else None)
            except Exception as exc:  # noqa: BLE001 - unreachable, no quorum: not the leader until it answers
                logger.info("promotion lease: %s", why(exc))
                etcd, self._lease, self._ok_at = None, None, None
            self._stop.wait(1.0)

    def stop(self) -> None:
        """Stop and give the lease back (another agent may take it at once)."""
        self._stop.set()
        self._thread.join(timeout=REQUEST_TIMEOUT + 2)
        if self._lease is not None:
            try:
                self._lease.revoke()
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                logger.info("could not give the promotion lease back: %s", why(exc))
        self._lease = self._ok_at = None


def votes(beats: Mapping[str, Mapping[str, Any]], pgbouncers: list[str], primary: str, after: float) -> tuple[int, int]:
    """(how many agents say ``primary`` has not answered them for ``after`` s, how many make a majority).

    Counted: one agent per PgBouncer of the inventory, in a heartbeat under ``HEARTBEAT_FRESH`` s old,
    that expects ``primary`` (same fleet view), with ``primary_silent_for`` plus the heartbeat's age at
    least ``after``. A PgBouncer without a fresh heartbeat counts against: the majority is of all of them."""
    dead = 0
    for name in pgbouncers:
        beat = beats.get(name)
        if not beat or float(beat.get("age", 1e9)) > HEARTBEAT_FRESH or beat.get("primary") != primary:
            continue
        silent = beat.get("primary_silent_for")
        if silent is not None and float(silent) + max(0.0, float(beat["age"])) >= after:
            dead += 1
    return dead, len(pgbouncers) // 2 + 1


@dataclass
class Candidate:
    """What the agent knows when it considers a promotion: the nodes, the standby's received WAL and the
    last WAL position it saw the primary write (bytes), or None when unknown."""

    primary: str
    standby: str
    standby_lsn: int | None
    primary_lsn: int | None


class AutoPromoter:
    """``consider(candidate)`` from the agent's loop while its PgBouncer is away; promotes when it may.

    ``say(action, message)`` records each decision (the agent's log and hooks)."""

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
        self._fence_retry_at = 0.0
        self._said: str | None = None

    def close(self) -> None:
        self.leadership.stop()

    def consider(self, candidate: Candidate) -> bool:
        """Promote ``candidate.standby`` if every condition holds now; True when it did."""
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + LOOK_EVERY
        if not self.leadership.held():
            return self._wait(f"not the promotion leader ({self.leadership.holder or 'nobody'} holds "
                              f"{self.leadership.key}): the leader decides")
        try:
            beats = agents(self.etcd)
        except OpsError as exc:
            return self._wait(f"cannot read the agents' heartbeats: {exc}")
        # Every PgBouncer counts: the inventory's, and any other whose agent beats (an inventory that lacks
        # some must not shrink the majority).
        pgbouncers = sorted(set(self.cluster.inventory.pgbouncers) | set(beats))
        dead, needed = votes(beats, pgbouncers, candidate.primary, self.after)
        if dead < needed:
            return self._wait(f"{dead} of {len(pgbouncers)} agents have seen {candidate.primary} silent for "
                              f"{self.after:g} s; {needed} needed to promote")
        if candidate.standby_lsn is None or candidate.primary_lsn is None:
            return self._wait(f"the WAL {candidate.standby} received, or the last {candidate.primary} wrote, is "
                              "unknown: cannot tell how much would be lost")
        lag = candidate.primary_lsn - candidate.standby_lsn
        if lag > self.spec.max_lag:
            return self._wait(f"{candidate.standby} lacks {lag} bytes of WAL the primary had written (max-lag "
                              f"{self.spec.max_lag}): promoting it would lose them")
        if now < self._fence_retry_at:
            return False
        fenced = self._fence(candidate.primary)
        if fenced is not None:
            self._fence_retry_at = time.monotonic() + FENCE_RETRY
            self.say("fence-failed", f"fencing {candidate.primary} failed ({fenced}): nothing promoted; trying "
                                     f"again in {FENCE_RETRY:g} s")
            return False
        if not self.leadership.held():  # the fence took a while: still the only one allowed?
            return self._wait("lost the promotion lease while fencing")
        try:
            plan = check_promote(self.cluster, candidate.standby)
            result = run_promote(self.cluster, plan)
        except OpsError as exc:
            self.say("promote-failed", f"promoting {candidate.standby} failed: {exc}")
            self._fence_retry_at = time.monotonic() + FENCE_RETRY
            return False
        self.say("promote", f"{result.text()}; {dead} of {len(pgbouncers)} agents saw {candidate.primary} silent "
                            f"for {self.after:g} s, {candidate.primary} fenced, lag {max(lag, 0)} bytes")
        self._record_state(candidate.standby, result.timeline_after)
        return True

    def _wait(self, why_not: str) -> bool:
        if why_not != self._said:
            self._said = why_not
            self.say("no-promotion", why_not)
        return False

    def _fence(self, node: str) -> str | None:
        """Run the fence command for ``node``; None when it exited 0, else why not."""
        spec = self.cluster.inventory.node(node)
        env = {**os.environ, "SRHT_READONLY_FENCE_NODE": node, "SRHT_READONLY_FENCE_DATA": spec.data,
               "SRHT_READONLY_FENCE_SSH": spec.ssh or ""}
        try:
            proc = subprocess.run(self.spec.fence, shell=True, env=env, capture_output=True, text=True,  # noqa: S602
                                  timeout=self.spec.fence_timeout)
        except subprocess.TimeoutExpired:
            return f"no answer within fence-timeout = {self.spec.fence_timeout:g} s"
        if proc.returncode != 0:
            return f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:] or 'no output'}"
        return None

    def _record_state(self, primary: str, timeline: int) -> None:
        """``PREFIX/state``: the primary the fleet should follow now (best effort: the promotion is done)."""
        try:
            client(self.etcd).put(f"{self.etcd.prefix}/state", json.dumps(
                {"primary": primary, "timeline": timeline, "by": f"agent {self.name}", "time": time.time()}))
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not record the new primary in etcd: %s", why(exc))

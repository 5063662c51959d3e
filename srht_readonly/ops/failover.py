"""The plan's "Failover procedure (read-only mode)": point every PgBouncer at another node.

Two phases (``fleet``): every config written first, then every PgBouncer reloaded at once. At
the same moment ``server_login_retry`` is lowered on each console: after a crash, PgBouncer's
failed login to the dead primary otherwise blocks the pool for the default 15 s
(docs/facts.md, PgBouncer). It is held at 0 until the pools reach the new node, then set to 1 s (or the
file's value where lower): measured here, reads came back 6 ms after the RELOAD instead of 0.8 s
with 1 s alone.

Re-running is safe: files already right are not rewritten, every PgBouncer is reloaded again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from . import interrupts
from .cluster import Cluster
from .errors import PartlyDone, Refused
from .fleet import Change, Fleet, seconds_setting
from .observe import NodeState, observe_nodes, primaries
from .sql import parse_lsn

logger = logging.getLogger(__name__)

LOGIN_RETRY = 1


@dataclass
class FailoverPlan:
    """Where the fleet goes, what that node is now, and each PgBouncer's change."""

    target: str
    target_role: str
    changes: dict[str, Change]
    targets_now: dict[str, str | None]
    login_retry: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def steps(self) -> list[str]:
        steps = []
        for name, change in self.changes.items():
            now = self.targets_now.get(name) or "?"
            verb = "rewrite" if change.changed else "keep (already right)"
            steps.append(f"{name}: {verb} config, entries {now} -> {self.target}")
        steps.append(f"RELOAD all {len(self.changes)} PgBouncers at once, only after every file is written")
        steps.append("every PgBouncer: SET server_login_retry = 0 until its pools reach the new node")
        for name, value in self.login_retry.items():
            steps.append(f"{name}: then SET server_login_retry = {LOGIN_RETRY} (now {value})")
        steps.append(f"check SHOW DATABASES on every PgBouncer shows {self.target}")
        return steps

    def title(self) -> str:
        return f"point every PgBouncer at {self.target} ({self.target_role})"


@dataclass
class FailoverResult:
    target: str
    target_role: str
    written: list[str]
    reloaded: list[str]
    login_retry_set: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        mode = (f" (a standby: read-only until `srht-readonly promote {self.target}`)"
                if self.target_role == "standby" else "")
        lowered = f"; server_login_retry lowered on {', '.join(self.login_retry_set)}" if self.login_retry_set else ""
        return (f"every PgBouncer points at {self.target}{mode}: {len(self.written)} config(s) rewritten, "
                f"{len(self.reloaded)} reloaded, in {self.seconds:.2f} s{lowered}")


def fleet_refusal(states: dict[str, NodeState], to: str) -> str | None:
    """Why pointing the fleet at ``to`` is unsafe, looking at every node (not only at ``to``), or None.

    Two primaries are a split brain: repointing would pick a side blindly. A standby that has
    received less WAL than another would lose, once promoted, what the other already has.
    """
    live = primaries(states)
    if len(live) > 1:
        return (f"{' and '.join(live)} are both primaries (a split brain): pointing the PgBouncers at one picks a "
                "side blindly. Stop the one that must lose (srht-readonly status shows both), or pass --force")
    target = states[to]
    if target.role != "standby" or target.receive_lsn is None:
        return None
    ahead = [(name, s.receive_lsn) for name, s in states.items()
             if name != to and s.role == "standby" and s.receive_lsn is not None
             and parse_lsn(s.receive_lsn) > parse_lsn(target.receive_lsn)]
    if ahead:
        name, lsn = max(ahead, key=lambda a: parse_lsn(a[1]))
        return (f"{name} has received more WAL than {to} ({lsn} > {target.receive_lsn}): fail over to {name}, "
                "which holds every write the other has, or pass --force")
    return None


def check_failover(cluster: Cluster, fleet: Fleet, to: str, *, force: bool = False) -> FailoverPlan:
    """Refuse (nothing changed) unless every PgBouncer is reachable, ``to`` answers, and ``to`` is the
    right node to go to (``fleet_refusal``)."""
    spec = cluster.node(to)
    states = observe_nodes(cluster.inventory)
    state = states[to]
    warnings = []
    if (why := fleet_refusal(states, to)) is not None:
        if not force:
            raise Refused(why)
        warnings.append(f"--force: {why.split(':')[0]}")
    if state.role == "down":
        if not force:
            raise Refused(f"{to} does not answer ({state.error}); pointing the PgBouncers at it would take reads "
                          f"down too. Start it, choose another node, or pass --force")
        warnings.append(f"--force: {to} does not answer; clients will fail until it does")
    elif state.role == "standby":
        warnings.append(f"{to} is a standby: services become read-only until `srht-readonly promote {to}`")
    fleet.open()
    fleet.require_all()
    observed = fleet.observe()
    changes = fleet.plan_repoint(spec)
    retry = {name: m.config.get("server_login_retry", "?") for name, m in fleet.members.items()
             if seconds_setting(m.config.get("server_login_retry")) > LOGIN_RETRY}
    return FailoverPlan(to, state.role, changes, {n: s.target for n, s in observed.items()}, retry, warnings)


def run_failover(cluster: Cluster, fleet: Fleet, plan: FailoverPlan, *, verify_timeout: float = 5,
                 login_retry: float | None = LOGIN_RETRY, keep_pools: bool = False) -> FailoverResult:
    """Phase one (write all, or put back and refuse), phase two (reload all at once), then verify.

    ``login_retry=None`` leaves each PgBouncer's ``server_login_retry`` as its file says (the
    drill's sabotage ``slow-login-retry`` shows what that costs after a crash). ``keep_pools``
    holds a server of each busy pool across the RELOAD (``Fleet.keep_pools``): for a repoint away
    from a node that still answers while logins churn (the end of a read-only window), never after
    a crash (a keeper would wait for the dead node).
    """
    start = time.monotonic()
    try:
        written = fleet.write(plan.changes)
    except (interrupts.Interrupted, KeyboardInterrupt) as exc:
        with interrupts.shielded():
            left = fleet.restore(plan.changes)
        raise PartlyDone(f"stopped ({exc or 'SIGINT'}) while the PgBouncer configs were being written; nothing was "
                         f"reloaded" + ("; these could not be put back:" if left else ", every file was put back"),
                         left) from exc
    reloaded = fleet.reload(login_retry=login_retry, keep=cluster.node(plan.target) if keep_pools else None)
    problems = {n: f"RELOAD failed: {o.error}" for n, o in reloaded.items() if not o.ok}
    wrong = fleet.verify(cluster.node(plan.target), timeout=verify_timeout)
    problems.update({n: w for n, w in wrong.items() if n not in problems})
    if problems:
        ok = [n for n in plan.changes if n not in problems]
        raise PartlyDone(
            f"the configs of every PgBouncer now point at {plan.target}, but not all of them run with it; "
            f"run the same command again once they are reachable:",
            {**{n: f"switched to {plan.target}" for n in ok}, **problems},
        )
    return FailoverResult(
        plan.target, plan.target_role, written, [n for n, o in reloaded.items() if o.ok],
        list(plan.login_retry) if login_retry is not None else [], time.monotonic() - start, plan.warnings,
    )

"""The plan's "Failover procedure (read-only mode)": point every PgBouncer at another node.

Two phases (``fleet``): every config written first, then every PgBouncer reloaded at once. At
the same moment ``server_login_retry`` is lowered on each console: after a crash, PgBouncer's
failed login to the dead primary otherwise blocks the pool for the default 15 s
(docs/facts.md, PgBouncer). It is held at 0 until the pools reach the new node, then set to 1 s (or the
file's value where lower): measured here, reads came back 6 ms after the RELOAD instead of 0.8 s
with 1 s alone.

Re-running is safe: files already right are not rewritten, every PgBouncer is reloaded again.

With an inventory ``[etcd]`` section, ``run_failover_with_agents`` goes through the agents
instead: the fleet's new desired state in one etcd transaction (``ops.desired``), each agent
repoints its own PgBouncer, all in parallel; the command repoints itself, as above, any PgBouncer
whose agent does not beat or did not report the new state within ``AGENTS_TIMEOUT`` s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import desired, interrupts
from .cluster import Cluster
from .errors import PartlyDone, Refused
from .fleet import Change, Fleet, seconds_setting
from .observe import NodeState, observe_nodes, primaries
from .sql import parse_lsn

logger = logging.getLogger(__name__)

LOGIN_RETRY = 1
#: Seconds ``run_failover_with_agents`` waits for the agents to report the new state.
AGENTS_TIMEOUT = 5.0


@dataclass
class FailoverPlan:
    """Where the fleet goes, what that node is now, and each PgBouncer's change."""

    target: str
    target_role: str
    changes: dict[str, Change]
    targets_now: dict[str, str | None]
    login_retry: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    through_agents: bool = False  # [etcd]: run_failover_with_agents

    def steps(self) -> list[str]:
        steps = []
        if self.through_agents:
            steps.append(f"write the fleet's desired state in etcd (every PgBouncer -> {self.target}); each "
                         f"PgBouncer's agent repoints it, all in parallel; for any whose agent does not report it "
                         f"within {AGENTS_TIMEOUT:g} s, this command does what follows")
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
    by_agents: dict[str, float] = field(default_factory=dict)  # with [etcd]: {name: seconds its agent took}
    generation: int | None = None  # with [etcd]: the fleet state's generation written

    def text(self) -> str:
        mode = (f" (a standby: read-only until `srht-readonly promote {self.target}`)"
                if self.target_role == "standby" else "")
        lowered = f"; server_login_retry lowered on {', '.join(self.login_retry_set)}" if self.login_retry_set else ""
        if self.generation is None:
            return (f"every PgBouncer points at {self.target}{mode}: {len(self.written)} config(s) rewritten, "
                    f"{len(self.reloaded)} reloaded, in {self.seconds:.2f} s{lowered}")
        agents = (f"by its agent: {', '.join(f'{n} ({t:.2f} s)' for n, t in self.by_agents.items())}"
                  if self.by_agents else "no agent reported it")
        own = (f"; by this command (no agent reported it): {', '.join(self.reloaded)}{lowered}"
               if self.reloaded else "")
        return (f"every PgBouncer points at {self.target}{mode}, fleet state generation {self.generation}, in "
                f"{self.seconds:.2f} s; {agents}{own}")


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


def run_failover_with_agents(cluster: Cluster, fleet: Fleet, plan: FailoverPlan, command: str, *,
                             timeout: float = AGENTS_TIMEOUT, say: Callable[[str], None] = logger.info,
                             ) -> FailoverResult:
    """``[etcd]``: write the fleet's new desired state (every PgBouncer on ``plan.target``), wait until each
    live agent reports it, then repoint the rest as ``run_failover`` does, and verify every PgBouncer."""
    spec = cluster.inventory.etcd
    assert spec is not None, "run_failover_with_agents needs [etcd]"
    start = time.monotonic()
    live = desired.live_agents(spec)
    states = observe_nodes(cluster.inventory)
    live_primaries = primaries(states)
    primary = plan.target if plan.target_role == "primary" else (live_primaries[0] if live_primaries else None)
    timeline = states[primary].timeline if primary is not None else None
    state = desired.publish(spec, command, primary=primary, timeline=timeline,
                            pgbouncers={name: plan.target for name in plan.changes})
    waiting = [name for name in plan.changes if name in live]
    say(f"fleet state generation {state.generation} written; waiting for the agents of "
        f"{', '.join(waiting) or 'no PgBouncer (none beats)'}")
    by_agents = desired.wait_converged(spec, state, waiting, timeout=timeout) if waiting else {}
    rest = [name for name in plan.changes if name not in by_agents]
    own: FailoverResult | None = None
    if rest:
        say("repointing from here: " + "; ".join(
            f"{n} ({'its agent did not report the new state' if n in live else 'no agent beats for it'})"
            for n in rest))
        try:
            with Fleet(cluster, rest) as others:
                others.open()
                others.require_all()
                changes = others.plan_repoint(cluster.node(plan.target))
                retry = {n: v for n, v in plan.login_retry.items() if n in rest}
                own = run_failover(cluster, others, FailoverPlan(plan.target, plan.target_role, changes,
                                                                 {}, retry))
        except Refused as exc:  # the state is written and agents moved theirs: no longer "nothing changed"
            raise PartlyDone(f"the fleet state (generation {state.generation}) says every PgBouncer points at "
                             f"{plan.target}, and its agents moved these; the others could not be repointed from "
                             f"here ({exc}); run the same command again once they are reachable:",
                             {**{n: f"switched to {plan.target} by its agent" for n in by_agents},
                              **dict.fromkeys(rest, "not switched")}) from exc
    wrong = fleet.verify(cluster.node(plan.target))
    if wrong:
        raise PartlyDone(f"the fleet state says every PgBouncer points at {plan.target}, but not all of them do; "
                         "run the same command again once they are reachable:",
                         {**{n: f"switched to {plan.target}" for n in plan.changes if n not in wrong}, **wrong})
    return FailoverResult(plan.target, plan.target_role, own.written if own else [], own.reloaded if own else [],
                          own.login_retry_set if own else [], time.monotonic() - start, plan.warnings,
                          by_agents, state.generation)

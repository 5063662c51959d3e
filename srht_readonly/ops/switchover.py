"""Planned switchover with zero failed client requests: the plan's failover, promotion and demotion in one.

Order (docs/facts.md, the sequence measured at 0 failed transactions):

1. before the pause: write every PgBouncer's new config (not reloaded), create the old
   primary's slot on the new one, CHECKPOINT the old primary (a short shutdown checkpoint),
   arm a dead-man timer on every PgBouncer host (``deadman``: RESUME after the pause limit);
2. PAUSE every PgBouncer (bounded by ``pause_timeout``; clients queue, nothing fails);
3. fast-stop the old primary and read ``pg_controldata``: it must say ``shut down``;
4. prove nothing is lost: the new primary has replayed past that shutdown checkpoint;
5. promote (polled, not ``pg_promote``'s 100 ms steps), RELOAD every PgBouncer, check SHOW DATABASES;
6. RESUME every PgBouncer and disarm the timers, always;
7. after the pause: the old primary follows the new one (no pg_rewind needed: step 4 proved it).

Every wait ends before the timers would fire. Whatever stops the procedure (a failed step, a
signal: ``interrupts``, a timeout), the recovery of its stage runs before RESUME:

* before ``pg_promote`` may have gone out: switch back. The old primary runs again (a stop
  under way finishes first), the old configs are put back, the slot is dropped. A failure
  refuses (exit 1, nothing changed); a signal is exit 3, the state named.
* ``pg_promote`` sent, the new node's state unknown: the old primary stays stopped (starting it
  could make two primaries), the PgBouncers are pointed at the new node; exit 3 with the next
  command.
* the new node is a primary: every PgBouncer is pointed at it; exit 3 naming what is left.

``kill -9`` runs no recovery: the timers RESUME the PgBouncers, ``status`` reports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import deadman, desired, interrupts, replication, sql
from .cluster import Cluster
from .demote import DemoteResult, check_demote, run_demote
from .errors import OpsError, PartlyDone, Refused, Timeout
from .fleet import Change, Fleet
from .hba import hba_line, replication_access
from .observe import observe_nodes, primaries
from .postgres import PostgresServer
from .promote import fast_promote

logger = logging.getLogger(__name__)

Say = Callable[[str], None]

MAX_LAG = 16 * 1024 * 1024
PAUSE_LIMIT = 30.0  # the dead-man timers RESUME every PgBouncer this long after they were armed
DEADMAN_MARGIN = 3.0  # every wait of the procedure ends this long before its timers fire


@dataclass
class SwitchoverPlan:
    """The checked starting point: who is primary, how far behind the target is, the new configs."""

    old: str
    new: str
    lag_bytes: int
    changes: dict[str, Change]
    pause_timeout: float
    pause_limit: float = PAUSE_LIMIT
    warnings: list[str] = field(default_factory=list)

    def steps(self) -> list[str]:
        rewrite = [n for n, c in self.changes.items() if c.changed]
        return [
            f"write the new config of {len(rewrite)} PgBouncer(s) ({', '.join(rewrite) or 'none'}): entries -> "
            f"{self.new} (not reloaded yet)",
            f"create replication slot {self.old!r} on {self.new}; CHECKPOINT {self.old}",
            f"arm a dead-man timer on every PgBouncer host: RESUME after {self.pause_limit:g} s if this command "
            "dies (kill -9, lost host)",
            f"PAUSE all {len(self.changes)} PgBouncers (at most {self.pause_timeout:g} s; clients wait, none fail)",
            f"stop {self.old} (fast); pg_controldata must say 'shut down'",
            f"check {self.new} replayed {self.old}'s shutdown checkpoint (nothing lost)",
            f"promote {self.new}; RELOAD every PgBouncer; SHOW DATABASES must show {self.new}",
            "RESUME every PgBouncer (always, even after a failure or a signal); disarm the timers",
            f"make {self.old} follow {self.new} (standby settings, start, wait until streaming)",
        ]

    def title(self) -> str:
        return f"switch the primary from {self.old} to {self.new}"


@dataclass
class SwitchoverResult:
    """What happened, with the write pause clients saw at PgBouncer (PAUSE sent to RESUME done)."""

    old: str
    new: str
    write_pause: float
    phases: dict[str, float]
    checkpoint_lsn: str
    timeline_before: int
    timeline_after: int
    demote: DemoteResult | None = None

    def text(self) -> str:
        phases = ", ".join(f"{k} {v:.3f}" for k, v in self.phases.items())
        follow = ""
        if self.demote is not None:
            follow = (f"; {self.old} follows {self.new} "
                      f"({'rewound' if self.demote.rewound else 'no pg_rewind needed'})")
        return (f"switched over {self.old} -> {self.new}: write pause {self.write_pause:.3f} s ({phases}); "
                f"timeline {self.timeline_before} -> {self.timeline_after}{follow}")


def check_switchover(cluster: Cluster, fleet: Fleet, to: str, *, max_lag: int = MAX_LAG,
                     pause_timeout: float = 5, pause_limit: float = PAUSE_LIMIT) -> SwitchoverPlan:
    """Refuse (nothing changed) unless a switchover to ``to`` can run cleanly."""
    if pause_limit < pause_timeout + 2 * DEADMAN_MARGIN:
        raise Refused(f"a pause limit of {pause_limit:g} s leaves no time to stop, check and promote after a PAUSE "
                      f"that may take {pause_timeout:g} s; give at least {pause_timeout + 2 * DEADMAN_MARGIN:g} s")
    new_spec = cluster.node(to)
    states = observe_nodes(cluster.inventory)
    new = states[to]
    live = primaries(states)
    if len(live) > 1:  # before "already the primary": its hint would demote a node that holds live writes
        raise Refused(f"{' and '.join(live)} are both primaries (split brain); resolve that first: "
                      f"`srht-readonly status` shows where the PgBouncers point")
    if new.role == "primary":
        others = [n for n, s in states.items() if n != to and not (s.role == "standby" and s.upstream == to)]
        hint = "".join(f"; {o} does not follow it yet: srht-readonly demote {o} --primary {to}" for o in others)
        raise Refused(f"{to} is already the primary; nothing to do{hint}")
    if new.role == "down":
        raise Refused(f"{to} does not answer ({new.error}); a switchover needs a healthy standby")
    if not live:
        raise Refused("no primary answers: this is not a planned switchover. Follow the unplanned path in "
                      f"docs/runbook.md: srht-readonly failover --to {to}, then promote {to}")
    old = live[0]
    if new.upstream != old or new.receiver_status != "streaming":
        raise Refused(f"{to} is not streaming from {old} (receiver: {new.receiver_status or 'none'}, upstream: "
                      f"{new.upstream or 'none'}); fix replication first (srht-readonly status)")
    if new.replay_paused:
        raise Refused(f"replay is paused on {to}; resume it with SELECT pg_wal_replay_resume() first")
    if new.lag_bytes is not None and new.lag_bytes > max_lag:
        raise Refused(f"{to} is {new.lag_bytes / 2**20:.1f} MB behind {old}; the pause would last until it catches "
                      f"up. Wait, or raise --max-lag")
    try:
        cluster.server(old).controldata()
    except OpsError as exc:
        raise Refused(f"cannot drive {old}'s server ({cluster.node(old).data}): {exc}") from exc
    user = cluster.inventory.replication.user
    verdict = replication_access(new_spec.dsn, user, cluster.node(old).address)
    if not verdict.allowed:
        method = "scram-sha-256" if cluster.inventory.replication.password_file else "trust"
        raise Refused(f"{old} could not follow {to} afterwards: {to}'s {verdict.file} does not let {user} stream "
                      f"from {cluster.node(old).address}; add this line and reload {to}:\n"
                      f"  {hba_line(user, cluster.node(old).address, method)}")
    fleet.open()
    fleet.require_all()
    paused = [n for n, s in fleet.observe().items() if s.paused]
    if paused:
        raise Refused(f"PgBouncer {', '.join(paused)} is already paused (an earlier run died?); clients are waiting. "
                      f"RESUME it on its console (psql ... dbname=pgbouncer -c RESUME), then try again")
    return SwitchoverPlan(old, to, new.lag_bytes or 0, fleet.plan_repoint(new_spec), pause_timeout, pause_limit)


class Stage(StrEnum):
    """Where a switchover is; each has its own recovery (``_Switchover.recover``)."""

    PREPARE = "prepare"  # configs written (not reloaded), slot created, CHECKPOINT, timers armed
    PAUSE = "pause"  # PAUSE sent to the PgBouncers
    STOP = "stop"  # the old primary is being stopped
    REPLAY = "replay"  # the old primary is stopped; waiting for the new one to replay its last record
    PROMOTE = "promote"  # from the moment pg_promote may have gone out
    RELOAD = "reload"  # the new primary is writable; the PgBouncers are being pointed at it


def run_switchover(cluster: Cluster, fleet: Fleet, plan: SwitchoverPlan, *, say: Say = logger.info,
                   catchup_timeout: float = 10, stop_timeout: float = 60) -> SwitchoverResult:
    """Carry out ``plan``; see the module docstring for the order and the failure handling.

    Any exception (a failed step, ``Interrupted`` by a signal, ``KeyboardInterrupt``, a
    subprocess timeout) runs the recovery of the stage it happened in, shielded from further
    signals, then the RESUME of every PgBouncer; the error raised says what state it left.
    """
    run = _Switchover(cluster, fleet, plan, say)
    # One connection to the new primary, open before anything changes, polls replay and promotion.
    with sql.connect(run.new_dsn) as conn, conn.cursor() as cur:
        try:
            promoted = run.switch(cur, catchup_timeout=catchup_timeout, stop_timeout=stop_timeout)
        except BaseException as exc:
            with interrupts.shielded():
                try:
                    failure: OpsError | None = run.recover(exc)
                except Exception as bad:  # the recovery itself broke: still RESUME, and say so
                    failure = PartlyDone(f"switchover stopped at the {run.stage} stage ({_why(exc)}) and its "
                                         f"recovery failed ({_why(bad)}); see `srht-readonly status`")
                failure = run.release(failure)
            assert failure is not None
            raise failure from exc
        with interrupts.shielded():
            failure = run.release(None)
        if failure is not None:
            raise failure
    pause = run.phases["resumed"]
    say(f"write pause {pause:.3f} s; {plan.new} is the primary (timeline {promoted[0]} -> {promoted[1]})")
    result = SwitchoverResult(plan.old, plan.new, pause, run.phases, run.lsn, promoted[0], promoted[1])
    say(f"making {plan.old} follow {plan.new}")
    try:
        sql.execute(run.new_dsn, "CHECKPOINT")
        result.demote = run_demote(cluster, check_demote(cluster, plan.old, plan.new))
    except (OpsError, interrupts.Interrupted, KeyboardInterrupt) as exc:
        raise PartlyDone(
            f"switchover done: {plan.new} is the primary and every PgBouncer points at it (write pause "
            f"{pause:.3f} s), but {plan.old} does not follow it yet; fix this and run "
            f"`srht-readonly demote {plan.old} --primary {plan.new}`:",
            {plan.old: _why(exc)},
        ) from exc
    return result


class _Switchover:
    """One switchover under way: its stage, what it created, and the recovery for each stage."""

    def __init__(self, cluster: Cluster, fleet: Fleet, plan: SwitchoverPlan, say: Say) -> None:
        self.cluster, self.fleet, self.plan, self.say = cluster, fleet, plan, say
        self.old_server = cluster.server(plan.old)
        self.new_dsn = cluster.node(plan.new).dsn
        self.stage = Stage.PREPARE
        self.written = False
        self.slot_created = False
        self.timers: dict[str, deadman.Timer] = {}
        self.flag: desired.PauseFlag | None = None
        self.phases: dict[str, float] = {}
        self.lsn = ""
        self.t0 = time.monotonic()
        self.deadline = float("inf")  # the dead-man timers fire soon after; every wait ends before

    def remaining(self, wanted: float) -> float:
        return max(0.1, min(wanted, self.deadline - time.monotonic()))

    def switch(self, cur: Any, *, catchup_timeout: float, stop_timeout: float) -> tuple[int, int, float]:
        plan, fleet, say = self.plan, self.fleet, self.say
        old, new = plan.old, plan.new
        say(f"writing {sum(c.changed for c in plan.changes.values())} PgBouncer config(s) (not reloaded yet)")
        fleet.write(plan.changes)
        self.written = True
        self.slot_created = replication.ensure_slot(self.new_dsn, old, reserve=True)
        sql.execute(self.cluster.node(old).dsn, "CHECKPOINT")
        say(f"arming a dead-man timer on every PgBouncer host (RESUME after {plan.pause_limit:g} s)")
        armed = time.monotonic()
        self.timers = fleet.arm_timers(plan.pause_limit)
        self.deadline = armed + plan.pause_limit - DEADMAN_MARGIN
        flagged = ""
        if self.cluster.inventory.etcd is not None:  # status shows who paused the fleet, until when at most
            self.flag = desired.PauseFlag(self.cluster.inventory.etcd, f"switchover --to {new}", plan.pause_limit)
            flagged = " (pause flag up in etcd)" if self.flag.raise_() else ""

        self.stage = Stage.PAUSE
        say(f"PAUSE {len(fleet.members)} PgBouncer(s){flagged}")
        self.t0 = time.monotonic()
        paused = fleet.pause(timeout=self.remaining(plan.pause_timeout))
        self.phases["paused"] = time.monotonic() - self.t0
        late = {n: o.error for n, o in paused.items() if not o.ok}
        if late:
            raise _Abort("PAUSE did not finish on " + "; ".join(f"{n}: {e}" for n, e in late.items())
                         + " (a long transaction is running there; see SHOW POOLS)")

        self.stage = Stage.STOP
        say(f"stopping {old} (fast)")
        control = stop_primary(self.old_server, timeout=self.remaining(stop_timeout))
        self.lsn = control["Latest checkpoint location"]
        self.phases["stopped"] = time.monotonic() - self.t0

        self.stage = Stage.REPLAY
        say(f"waiting for {new} to replay {old}'s shutdown checkpoint {self.lsn}")
        if not _replayed_past(cur, self.lsn, self.remaining(catchup_timeout)):
            raise _Abort(f"{new} did not replay {old}'s shutdown checkpoint {self.lsn} within {catchup_timeout:g} s")
        self.phases["replayed"] = time.monotonic() - self.t0

        say(f"promoting {new}")
        promoted = fast_promote(self.new_dsn, on_sent=self._sent)
        self.phases["promoted"] = time.monotonic() - self.t0

        self.stage = Stage.RELOAD
        say(f"RELOAD {len(fleet.members)} PgBouncer(s)")
        wrong = self._point_at_new()
        self.phases["reloaded"] = time.monotonic() - self.t0
        if wrong:
            raise _Abort("some PgBouncers do not point at it", wrong)
        return promoted

    def _sent(self) -> None:
        self.stage = Stage.PROMOTE

    def _point_at_new(self) -> dict[str, str]:
        """RELOAD every PgBouncer (their files name the new primary); {name: why} where it does not show."""
        reloaded = self.fleet.reload()
        wrong = {n: f"RELOAD failed: {o.error}" for n, o in reloaded.items() if not o.ok}
        wrong.update({n: w for n, w in self.fleet.verify(self.cluster.node(self.plan.new), timeout=5).items()
                      if n not in wrong})
        return wrong

    def recover(self, exc: BaseException) -> OpsError:
        """Put the fleet in a known state for the stage ``exc`` happened in; the error that says which."""
        why = f"{self.stage} failed: {_why(exc)}"
        interrupted = isinstance(exc, interrupts.Interrupted | KeyboardInterrupt)
        if interrupted:
            why = f"{_why(exc)} during the {self.stage} stage"
        self.say(f"{why}; recovering")
        if not self.written and isinstance(exc, OpsError):
            return exc  # writing the configs failed: ``Fleet.write`` put back what it wrote and says so
        self.fleet.close()  # a PAUSE still pending on a console would hang after RESUME: drop it, reconnect
        self.fleet.reconnect()
        if self.stage in (Stage.REPLAY, Stage.PROMOTE) and _is_primary(self.new_dsn):
            self.stage = Stage.RELOAD
        if self.stage == Stage.RELOAD:
            return self._finish_pointing(why, exc)
        if self.stage == Stage.PROMOTE:
            return self._promotion_unknown(why)
        return self._switch_back(why, interrupted)

    def _switch_back(self, why: str, interrupted: bool) -> OpsError:
        """Before any promotion: the old primary runs again, the old configs are back, the slot is gone."""
        old, new = self.plan.old, self.plan.new
        problems = {}
        if self.stage in (Stage.STOP, Stage.REPLAY, Stage.PROMOTE):
            try:
                self._restart_old()
            except OpsError as exc:
                problems[old] = f"could not be started again: {exc}"
        problems.update(self.fleet.restore(self.plan.changes))
        if self.slot_created:
            try:
                replication.drop_slot(self.new_dsn, old)
            except OpsError as exc:
                problems[new] = f"slot {old!r} left behind: {exc}"
        if problems:
            return PartlyDone(f"switchover aborted ({why}), and switching back failed:", problems)
        if interrupted:
            return PartlyDone(f"switchover aborted ({why}). Switched back: {old} is the primary again, every "
                              f"PgBouncer was resumed on it with its old config, and the slot was dropped",
                              {old: "primary", new: f"standby of {old}"})
        return Refused(f"switchover aborted: {why}. Switched back: {old} is the primary again, every PgBouncer "
                       f"was resumed on it, nothing changed")

    def _restart_old(self) -> None:
        """The old primary as it was: still running as primary, or stopped cleanly and started again."""
        if self.stage == Stage.STOP and self.old_server.is_running() and _is_primary(self.cluster.node(
                self.plan.old).dsn):
            return  # the stop never reached it
        stop_primary(self.old_server, timeout=60)  # a stop under way ends first: a clean shutdown
        self.old_server.start()

    def _finish_pointing(self, why: str, exc: BaseException) -> OpsError:
        """The new primary is writable: point every PgBouncer at it (again); never go back."""
        old, new = self.plan.old, self.plan.new
        try:
            wrong = self._point_at_new()
        except OpsError as again:
            wrong = {"pgbouncers": str(again)}
        if isinstance(exc, _Abort) and exc.hosts and wrong:
            wrong = {**exc.hosts, **wrong}
        if wrong:
            return PartlyDone(f"{new} is the primary, but these PgBouncers do not point at it ({why}); run "
                              f"`srht-readonly failover --to {new}` once they are reachable:", wrong)
        return PartlyDone(f"switchover stopped after the promotion ({why}): {new} is the primary and every "
                          f"PgBouncer points at it; {old} is stopped and does not follow it yet: run "
                          f"`srht-readonly demote {old} --primary {new}`",
                          {new: "primary", old: "stopped"})

    def _promotion_unknown(self, why: str) -> OpsError:
        """``pg_promote`` may have gone out and the new node's state is unknown: the old primary stays stopped
        (starting it could make two primaries), and the PgBouncers go to the new node (reads at least)."""
        old, new = self.plan.old, self.plan.new
        try:
            wrong = self._point_at_new()
        except OpsError as again:
            wrong = {"pgbouncers": str(again)}
        hosts = {new: "pg_promote sent; outcome unknown",
                 old: "stopped cleanly (everything it wrote was replayed on the new node); NOT restarted", **wrong}
        return PartlyDone(
            f"switchover stopped while {new} was being promoted ({why}). {old} stays stopped: starting it again "
            f"could make two primaries. Every PgBouncer {'reachable ' if wrong else ''}was pointed at {new}. "
            f"Next: `srht-readonly status`; if {new} is a primary, `srht-readonly demote {old} --primary {new}`; "
            f"if it is still a standby, `srht-readonly promote {new}` first:", hosts)

    def release(self, failure: OpsError | None) -> OpsError | None:
        """RESUME every PgBouncer (always) and disarm the timers; ``failure`` with what went wrong here added."""
        resumed = self.fleet.resume()
        self.phases["resumed"] = time.monotonic() - self.t0
        self.fleet.lift_login_backoff()
        stuck = {n: f"RESUME failed, clients are still waiting: {o.error}" for n, o in resumed.items() if not o.ok}
        # A PgBouncer that did not take the RESUME keeps its timer: it RESUMEs it if nobody does first.
        fired = self.fleet.disarm_timers({n: t for n, t in self.timers.items() if n not in stuck})
        if self.flag is not None and not stuck:
            self.flag.lower()
        for name, record in fired.items():
            self.say(f"PgBouncer {name}: {record}")
        if stuck:
            armed = [n for n in stuck if n in self.timers]
            backstop = (f" (their dead-man timers stay armed and RESUME {', '.join(armed)} "
                        f"{self.plan.pause_limit:g} s after the pause began)" if armed else "")
            return PartlyDone(f"these PgBouncers are still PAUSED; RESUME them on their console now{backstop}:",
                              {**stuck, **(failure.hosts if isinstance(failure, PartlyDone) else {})})
        return failure


_STOP = r"""
bin=$1; data=$2; tries=$3
export LC_ALL=C
if "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1; then
    "$bin/pg_ctl" stop -D "$data" -m fast -W >/dev/null || exit 1
fi
i=0
while :; do
    out=$("$bin/pg_controldata" -D "$data" 2>/dev/null)
    if printf '%s\n' "$out" | grep -q '^Database cluster state: *shut down$'; then
        printf '%s\n' "$out"; exit 0
    fi
    i=$((i + 1))
    if [ "$i" -gt "$tries" ]; then printf '%s\n' "$out"; exit 3; fi
    sleep 0.005
done
"""


def stop_primary(server: PostgresServer, *, timeout: float = 60) -> dict[str, str]:
    """Fast-stop and return ``pg_controldata`` as soon as it says ``shut down`` (one round trip, even over ssh).

    ``pg_ctl stop -w`` checks every 100 ms; polling the control file is what keeps the pause short.
    """
    proc = server.host.run(["sh", "-c", _STOP, "sh", str(server.bin), str(server.data), str(int(timeout * 150))],
                           user=server.os_user, check=False, timeout=timeout + 30)
    control = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            control[key.strip()] = value.strip()
    if proc.returncode == 3:
        raise Timeout(f"{server.data} did not reach 'shut down' within {timeout:g} s "
                      f"(state: {control.get('Database cluster state', '?')})")
    if proc.returncode != 0 or "Latest checkpoint location" not in control:
        raise OpsError(f"pg_ctl stop failed on {server.host.name}: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return control


def _replayed_past(cur: object, lsn: str, timeout: float) -> bool:
    """Poll until the standby has replayed beyond ``lsn`` (the shutdown checkpoint record itself)."""
    deadline = time.monotonic() + timeout
    while True:
        cur.execute("SELECT pg_last_wal_replay_lsn() > %s::pg_lsn", (lsn,))  # type: ignore[attr-defined]
        if cur.fetchone()[0]:  # type: ignore[attr-defined]
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


def _is_primary(dsn: str) -> bool:
    try:
        return sql.role(dsn) == "primary"
    except OpsError:
        return False


def _why(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    return str(exc).strip() or type(exc).__name__


class _Abort(Exception):
    """Stop the switchover at this step; ``hosts`` names what is wrong where."""

    def __init__(self, message: str, hosts: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.hosts = hosts or {}

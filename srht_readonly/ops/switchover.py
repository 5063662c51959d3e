"""Planned switchover with zero failed client requests: the plan's failover, promotion and demotion in one.

Order (docs/facts.md, the sequence measured at 0 failed transactions):

1. before the pause: write every PgBouncer's new config (not reloaded), create the old
   primary's slot on the new one, CHECKPOINT the old primary (a short shutdown checkpoint);
2. PAUSE every PgBouncer (bounded by ``pause_timeout``; clients queue, nothing fails);
3. fast-stop the old primary and read ``pg_controldata``: it must say ``shut down``;
4. prove nothing is lost: the new primary has replayed past that shutdown checkpoint;
5. promote (polled, not ``pg_promote``'s 100 ms steps), RELOAD every PgBouncer, check SHOW DATABASES;
6. RESUME every PgBouncer, always, in a ``finally``;
7. after the pause: the old primary follows the new one (no pg_rewind needed: step 4 proved it).

Until the promotion, every failure switches back: the old primary is started again, the old
configs are put back, and the command refuses (exit 1). After it, failures are reported host by
host (exit 3) with what to run next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2

from . import replication, sql
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


@dataclass
class SwitchoverPlan:
    """The checked starting point: who is primary, how far behind the target is, the new configs."""

    old: str
    new: str
    lag_bytes: int
    changes: dict[str, Change]
    pause_timeout: float
    warnings: list[str] = field(default_factory=list)

    def steps(self) -> list[str]:
        rewrite = [n for n, c in self.changes.items() if c.changed]
        return [
            f"write the new config of {len(rewrite)} PgBouncer(s) ({', '.join(rewrite) or 'none'}): entries -> "
            f"{self.new} (not reloaded yet)",
            f"create replication slot {self.old!r} on {self.new}; CHECKPOINT {self.old}",
            f"PAUSE all {len(self.changes)} PgBouncers (at most {self.pause_timeout:g} s; clients wait, none fail)",
            f"stop {self.old} (fast); pg_controldata must say 'shut down'",
            f"check {self.new} replayed {self.old}'s shutdown checkpoint (nothing lost)",
            f"promote {self.new}; RELOAD every PgBouncer; SHOW DATABASES must show {self.new}",
            "RESUME every PgBouncer (always, even after a failure)",
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
                     pause_timeout: float = 5) -> SwitchoverPlan:
    """Refuse (nothing changed) unless a switchover to ``to`` can run cleanly."""
    new_spec = cluster.node(to)
    states = observe_nodes(cluster.inventory)
    new = states[to]
    if new.role == "primary":
        others = [n for n, s in states.items() if n != to and not (s.role == "standby" and s.upstream == to)]
        hint = "".join(f"; {o} does not follow it yet: srht-readonly demote {o} --primary {to}" for o in others)
        raise Refused(f"{to} is already the primary; nothing to do{hint}")
    if new.role == "down":
        raise Refused(f"{to} does not answer ({new.error}); a switchover needs a healthy standby")
    live = primaries(states)
    if not live:
        raise Refused("no primary answers: this is not a planned switchover. Follow the unplanned path in "
                      f"docs/runbook.md: srht-readonly failover --to {to}, then promote {to}")
    if len(live) > 1:
        raise Refused(f"{' and '.join(live)} are both primaries (split brain); resolve that first")
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
    return SwitchoverPlan(old, to, new.lag_bytes or 0, fleet.plan_repoint(new_spec), pause_timeout)


def run_switchover(cluster: Cluster, fleet: Fleet, plan: SwitchoverPlan, *, say: Say = logger.info,
                   catchup_timeout: float = 10, stop_timeout: float = 60) -> SwitchoverResult:
    """Carry out ``plan``; see the module docstring for the order and the failure handling."""
    old, new = plan.old, plan.new
    old_server, new_dsn = cluster.server(old), cluster.node(new).dsn
    # One connection to the new primary, open before anything changes, polls replay and promotion.
    with sql.connect(new_dsn) as conn, conn.cursor() as cur:
        say(f"writing {sum(c.changed for c in plan.changes.values())} PgBouncer config(s) (not reloaded yet)")
        fleet.write(plan.changes)
        try:
            slot_created = replication.ensure_slot(new_dsn, old, reserve=True)
            sql.execute(cluster.node(old).dsn, "CHECKPOINT")
        except OpsError as exc:
            fleet.write({n: Change(n, c.new, c.old) for n, c in plan.changes.items()})
            raise Refused(f"preparing the switchover failed: {exc}; the PgBouncer configs were put back") from exc

        def switch_back(why: str, restart_old: bool) -> OpsError:
            """Undo everything before the promotion; the error to raise after RESUME."""
            problems = {}
            if restart_old:
                try:
                    if not old_server.is_running():
                        old_server.start()
                except OpsError as exc:
                    problems[old] = f"could not be started again: {exc}"
            try:
                fleet.write({n: Change(n, c.new, c.old) for n, c in plan.changes.items()})
            except OpsError as exc:
                problems["pgbouncer configs"] = f"could not all be put back: {exc}"
            if slot_created:
                try:
                    replication.drop_slot(new_dsn, old)
                except OpsError as exc:
                    problems[new] = f"slot {old!r} left behind: {exc}"
            if problems:
                return PartlyDone(f"switchover aborted ({why}), and switching back failed:", problems)
            return Refused(f"switchover aborted: {why}. Switched back: {old} is the primary again, every PgBouncer "
                           f"was resumed on it, nothing changed")

        phases: dict[str, float] = {}
        failure: OpsError | None = None
        promoted: tuple[int, int, float] | None = None
        lsn = ""
        stage = "pause"
        say(f"PAUSE {len(fleet.members)} PgBouncer(s)")
        t0 = time.monotonic()
        try:
            paused = fleet.pause(timeout=plan.pause_timeout)
            phases["paused"] = time.monotonic() - t0
            late = {n: o.error for n, o in paused.items() if not o.ok}
            if late:
                raise _Abort("PAUSE did not finish on " + "; ".join(f"{n}: {e}" for n, e in late.items())
                             + " (a long transaction is running there; see SHOW POOLS)")
            stage = "stop"
            control = stop_primary(old_server, timeout=stop_timeout)
            lsn = control["Latest checkpoint location"]
            phases["stopped"] = time.monotonic() - t0
            stage = "replay"
            if not _replayed_past(cur, lsn, catchup_timeout):
                raise _Abort(f"{new} did not replay {old}'s shutdown checkpoint {lsn} within {catchup_timeout:g} s")
            phases["replayed"] = time.monotonic() - t0
            stage = "promote"
            promoted = fast_promote(new_dsn)
            phases["promoted"] = time.monotonic() - t0
            stage = "reload"
            reloaded = fleet.reload()
            wrong = {n: f"RELOAD failed: {o.error}" for n, o in reloaded.items() if not o.ok}
            wrong.update({n: w for n, w in fleet.verify(cluster.node(new), timeout=5).items() if n not in wrong})
            phases["reloaded"] = time.monotonic() - t0
            if wrong:
                raise _Abort("some PgBouncers do not point at it", wrong)
        except (_Abort, OpsError, psycopg2.Error) as exc:
            why = str(exc).strip()
            if stage == "promote" and _is_primary(new_dsn):
                stage = "reload"
            if stage == "reload":
                hosts = exc.hosts if isinstance(exc, _Abort) and exc.hosts else {"pgbouncers": why}
                failure = PartlyDone(f"{new} is the primary, but these PgBouncers do not point at it; run "
                                     f"`srht-readonly failover --to {new}` once they are reachable:", hosts)
            else:
                failure = switch_back(f"{stage} failed: {why}", restart_old=stage != "pause")
        finally:
            resumed = fleet.resume()
            phases["resumed"] = time.monotonic() - t0
            stuck = {n: f"RESUME failed, clients are still waiting: {o.error}" for n, o in resumed.items() if not o.ok}
            if stuck:
                failure = PartlyDone("these PgBouncers are still PAUSED; RESUME them on their console now:",
                                     {**stuck, **(failure.hosts if isinstance(failure, PartlyDone) else {})})
        if failure is not None:
            raise failure
    assert promoted is not None
    pause = phases["resumed"]
    say(f"write pause {pause:.3f} s; {new} is the primary (timeline {promoted[0]} -> {promoted[1]})")
    result = SwitchoverResult(old, new, pause, phases, lsn, promoted[0], promoted[1])
    sql.execute(new_dsn, "CHECKPOINT")
    say(f"making {old} follow {new}")
    try:
        result.demote = run_demote(cluster, check_demote(cluster, old, new))
    except OpsError as exc:
        raise PartlyDone(
            f"switchover done: {new} is the primary and every PgBouncer points at it (write pause {pause:.3f} s), "
            f"but {old} does not follow it yet; fix this and run `srht-readonly demote {old} --primary {new}`:",
            {old: str(exc)},
        ) from exc
    return result


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


class _Abort(Exception):
    """Stop the switchover at this step; ``hosts`` names what is wrong where."""

    def __init__(self, message: str, hosts: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.hosts = hosts or {}

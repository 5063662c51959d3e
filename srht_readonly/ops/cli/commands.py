"""The procedure commands of ``srht-readonly`` (status, standby prepare, failover, promote, demote,
switchover), each a thin wrapper: load the inventory, take the operator lock, check, show the plan,
confirm, run, render. The group is ``cli``'s ``main``; the shared options are in ``options``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from .. import desired, interrupts, render
from ..cluster import Cluster
from ..demote import check_demote, run_demote
from ..errors import Refused
from ..etcd import FleetLock
from ..failover import FailoverPlan, FailoverResult, check_failover, run_failover, run_failover_with_agents
from ..fleet import Fleet
from ..hooks import Hooks
from ..inventory import load, resolve_path
from ..lock import OperatorLock, lock_path
from ..observe import observe_nodes, primaries
from ..procedure import Plan, Result
from ..promote import PromoteResult, check_promote, run_promote
from ..standby import PreparePlan, PrepareResult, check_prepare, run_prepare
from ..status import CHECK_UNKNOWN, check_exit, collect
from ..switchover import MAX_LAG, PAUSE_LIMIT, SwitchoverResult, check_switchover, run_switchover
from .options import EXIT_REFUSED, changing, failures, following, option_json


@contextmanager
def session(ctx: click.Context, command: str | None, as_json: bool) -> Iterator[Cluster]:
    """The inventory's cluster for one command; ``command`` (a changing one) also takes the operator lock."""
    with failures(as_json):
        inventory = load(resolve_path(ctx.obj["config"]))
        lock = OperatorLock(lock_path(inventory.path), command) if command else None
        fleet_lock = FleetLock(inventory.etcd, command) if command and inventory.etcd else None
        if lock is not None:
            lock.acquire()
        try:
            if fleet_lock is not None:  # every operator, whichever machine they run on (ops.etcd)
                fleet_lock.acquire()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    try:
        with Cluster(inventory, ssh_config=ctx.obj["ssh_config"]) as cluster:
            yield cluster
    finally:
        if fleet_lock is not None:
            fleet_lock.release()
        if lock is not None:
            lock.release()


def confirm(title: str, steps: Sequence[str], warnings: Sequence[str], *, dry_run: bool, yes: bool) -> None:
    """Show the plan (on stderr); stop after it on ``--dry-run``; ask unless ``--yes``."""
    click.echo(render.plan_text(title, steps, warnings), err=True)
    if dry_run:
        click.echo("dry run: nothing was changed", err=True)
        raise click.exceptions.Exit(0)
    if not yes and not click.confirm("Proceed?", default=False, err=True):
        click.echo("not confirmed: nothing was changed", err=True)
        raise click.exceptions.Exit(EXIT_REFUSED)


#: The event hook of the procedure running in this process (``carry_out`` sets it), for ``say``.
_hooks: Hooks | None = None


def say(message: str) -> None:
    """Progress on stderr; a terminal that is gone (the operator's ssh session died) must not stop a recovery.
    Each line is also a ``step`` event for the inventory's ``[hooks] command``."""
    with contextlib.suppress(OSError):
        click.echo(f"... {message}", err=True)
    if _hooks is not None:
        _hooks.emit("step", message=message)


def carry_out(ctx: click.Context, command: str, *, as_json: bool, dry_run: bool, yes: bool,
              check: Callable[[Cluster, Fleet | None], Plan], run: Callable[[Cluster, Fleet | None, Any], Result],
              fleet: bool = False) -> None:
    """Every changing command: inventory and operator lock, ``check``, show the plan and confirm,
    ``run``, print the result (text or JSON). ``fleet``: the procedure drives the PgBouncers too."""
    global _hooks
    with session(ctx, None if dry_run else command, as_json) as cluster, \
            (Fleet(cluster) if fleet else contextlib.nullcontext()) as bouncers:
        with failures(as_json):
            plan = check(cluster, bouncers)
        confirm(plan.title(), plan.steps(), plan.warnings, dry_run=dry_run, yes=yes)
        hooks = _hooks = Hooks(cluster.inventory.hooks.command, command_name=command,
                               inventory=cluster.inventory.path)
        hooks.emit("start", title=plan.title(), steps=list(plan.steps()), warnings=list(plan.warnings))
        try:
            with failures(as_json, changing=True), interrupts.raising():
                result = run(cluster, bouncers, plan)
        except click.ClickException as exc:
            hooks.emit("failed", exit=exc.exit_code, error=exc.format_message())
            raise
        except BaseException as exc:
            hooks.emit("failed", exit=None, error=str(exc) or type(exc).__name__)
            raise
        else:
            hooks.emit("done", result=result.text())
        finally:
            _hooks = None
            hooks.close()
    click.echo(render.to_json(result) if as_json else result.text())


@click.command()
@option_json
@click.option("--check", is_flag=True,
              help="Nagios-style exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (status could not run).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, check: bool) -> None:
    """Each node's observed role, timeline, position, lag and slots; each PgBouncer's target.

    Unreachable nodes and PgBouncers are reported, not fatal. Problems flagged include a
    standby that does not stream, inactive slots holding WAL, PgBouncers split between nodes
    or paused (or resumed by a switchover's dead-man timer), server_login_retry above 3 s,
    auth_type = trust, and a slow primary: a tiny commit timed on it (median of 3) above
    [status] slow-commit in the inventory (0.1 s by default). Expected states page
    nobody (severity info): PgBouncers on the standby during an announced maintenance window,
    auth_type = trust on a PgBouncer listening on loopback only.

    \b
    With --check, the exit status is Nagios' (for cron, Nagios/Icinga and alerting):
      0 OK (nothing, or only info), 1 WARNING, 2 CRITICAL,
      3 UNKNOWN: status itself could not run (an inventory error too, which is 2 elsewhere).

    \b
    Example:
      srht-readonly status
      srht-readonly status --json | jq '.nodes[] | {name, role, lag_bytes}'
      srht-readonly status --check || mail -s 'database needs attention' ops@example.org
    """
    try:
        with session(ctx, None, as_json) as cluster, failures(as_json):
            result = collect(cluster)
    except click.ClickException as exc:
        if not check:
            raise
        exc.show()
        click.echo(f"UNKNOWN: status could not run (exit {CHECK_UNKNOWN} under --check)", err=True)
        ctx.exit(CHECK_UNKNOWN)
    except Exception as exc:  # noqa: BLE001 - a monitoring check must say UNKNOWN, not crash with 1
        if not check:
            raise
        click.echo(f"UNKNOWN: status could not run: {type(exc).__name__}: {exc}", err=True)
        ctx.exit(CHECK_UNKNOWN)
    click.echo(render.to_json(result) if as_json else render.status_text(result))
    if check:
        ctx.exit(check_exit(result))


@click.group()
def standby() -> None:
    """Build hot standbys (the plan's "Preparing the hot standby").

    \b
    Example:
      srht-readonly standby prepare konpaku --from remilia
    """


@standby.command("prepare")
@following("--from", "PRIMARY", "The primary to copy.",
           force="Stop NODE and move its data directory aside (kept) if it has one.")
def standby_prepare(ctx: click.Context, node: str, primary: str, force: bool, dry_run: bool, yes: bool,
                    as_json: bool) -> None:
    """Make NODE a streaming hot standby of PRIMARY, steps 1-8 of the plan.

    Replication role (password from [replication] password-file, never in argv or logs),
    a pg_hba.conf line for NODE's address only, a slot, a base backup with a progress bar,
    standby settings, start, wait for streaming, sanity check. A running primary is never
    overwritten; an existing data directory is moved aside only with --force.

    \b
    Example:
      srht-readonly standby prepare konpaku --from remilia --dry-run
      srht-readonly standby prepare konpaku --from remilia --force --yes
    """
    def run(cluster: Cluster, _: Fleet | None, plan: PreparePlan) -> PrepareResult:
        bar = _ProgressBar(as_json)
        try:
            return run_prepare(cluster, plan, progress=bar.update)
        finally:
            bar.close()

    carry_out(ctx, f"standby prepare {node}", as_json=as_json, dry_run=dry_run, yes=yes, run=run,
              check=lambda cluster, _: check_prepare(cluster, node, primary, force=force))


@click.command()
@click.option("--to", "to", required=True, metavar="NODE", help="The node every PgBouncer will point at.")
@click.option("--force", is_flag=True, help="Point at NODE even if it does not answer.")
@changing
def failover(ctx: click.Context, to: str, force: bool, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Read-only failover: point every PgBouncer at NODE (usually the standby).

    Two phases: every PgBouncer's config is written first (atomically, mode and owner kept);
    only when all are written are all reloaded at once. If any cannot be written, those
    written are put back and nothing is reloaded. An unreachable PgBouncer refuses the whole
    switch. server_login_retry is lowered to 1 s on each console, so reads come back within
    a second of a crash instead of 15 s. Then promote NODE to bring writes back.

    With [etcd] in the inventory: the fleet's desired state is written in etcd in one
    transaction, each PgBouncer's agent (srht-readonly agent) repoints its own PgBouncer, all
    in parallel, and this command repoints as above any whose agent does not report it within
    5 s (docs/agent.md).

    \b
    Example:
      srht-readonly failover --to konpaku --dry-run
      srht-readonly failover --to konpaku --yes && srht-readonly promote konpaku --yes
    """
    def check(cluster: Cluster, fleet: Fleet | None) -> FailoverPlan:
        plan = check_failover(cluster, _the(fleet), to, force=force)
        plan.through_agents = cluster.inventory.etcd is not None
        return plan

    def run(cluster: Cluster, fleet: Fleet | None, plan: FailoverPlan) -> FailoverResult:
        if plan.through_agents:
            return run_failover_with_agents(cluster, _the(fleet), plan, f"failover --to {to}", say=say)
        return run_failover(cluster, _the(fleet), plan)

    carry_out(ctx, f"failover --to {to}", as_json=as_json, dry_run=dry_run, yes=yes, fleet=True, check=check,
              run=run)


@click.command()
@click.argument("node")
@click.option("--force", is_flag=True, help="Promote even though another node is still a primary.")
@click.option("--replay-timeout", default=10.0, show_default=True, metavar="SECONDS",
              help="How long to wait for NODE to replay what it received before refusing.")
@changing
def promote(ctx: click.Context, node: str, force: bool, replay_timeout: float, dry_run: bool, yes: bool,
            as_json: bool) -> None:
    """Promote the standby NODE to primary (the plan's "Standby promotion procedure").

    Refuses, changing nothing, if NODE is not a standby, if another node still accepts
    writes (split brain; --force overrides), or if NODE has not replayed all it received.
    Then pg_promote, check the timeline went up, CHECKPOINT.

    \b
    Example:
      srht-readonly promote konpaku --dry-run
      srht-readonly promote konpaku --yes
    """
    def run(cluster: Cluster, _: Fleet | None, plan: Any) -> PromoteResult:
        result = run_promote(cluster, plan)
        if cluster.inventory.etcd is not None:
            # Every PgBouncer on the new primary, unless another node still answers as one (a forced promote
            # in a split brain): then the targets stay as they were, and the operator decides with failover.
            others = [n for n in primaries(observe_nodes(cluster.inventory)) if n != node]
            _record_primary(cluster, f"promote {node}", node, result.timeline_after,
                            None if others else {name: node for name in cluster.inventory.pgbouncers})
        return result

    carry_out(ctx, f"promote {node}", as_json=as_json, dry_run=dry_run, yes=yes, run=run,
              check=lambda cluster, _: check_promote(cluster, node, force=force, replay_timeout=replay_timeout))


@click.command()
@following("--primary", "NEW", "The node NODE will follow.",
           force="Demote NODE even while it runs as a primary, or runs and does not answer (its newer writes "
                 "are lost).")
def demote(ctx: click.Context, node: str, primary: str, force: bool, dry_run: bool, yes: bool,
           as_json: bool) -> None:
    """Make the former primary NODE a standby of NEW (the plan's "Master demotion procedure").

    Slot on NEW, replication access checked in NEW's pg_hba.conf, pg_rewind if NODE wrote
    WAL that NEW never saw (wal_log_hints or checksums checked first), standby settings,
    start, wait until it streams and has caught up.

    \b
    Example:
      srht-readonly demote remilia --primary konpaku --dry-run
      srht-readonly demote remilia --primary konpaku --yes
    """
    carry_out(ctx, f"demote {node}", as_json=as_json, dry_run=dry_run, yes=yes,
              check=lambda cluster, _: check_demote(cluster, node, primary, force=force),
              run=lambda cluster, _, plan: run_demote(cluster, plan))


@click.command()
@click.option("--to", "to", required=True, metavar="NODE", help="The standby that becomes the primary.")
@click.option("--pause-timeout", default=5.0, show_default=True, metavar="SECONDS",
              help="Longest wait for PAUSE (running transactions) before giving up, changing nothing.")
@click.option("--pause-limit", default=PAUSE_LIMIT, show_default=True, metavar="SECONDS",
              help="Dead-man limit: each PgBouncer host RESUMEs its PgBouncer this long after the pause began "
                   "unless this command ends it first (kill -9, lost host). At least --pause-timeout + 6.")
@click.option("--max-lag", default=MAX_LAG // 2**20, show_default=True, metavar="MB",
              help="Refuse when NODE is further behind than this.")
@changing
def switchover(ctx: click.Context, to: str, pause_timeout: float, pause_limit: float, max_lag: int, dry_run: bool,
               yes: bool, as_json: bool) -> None:
    """Planned switchover to NODE with no failed client request; prints the write pause.

    PAUSE every PgBouncer, fast-stop the primary, prove NODE replayed its shutdown checkpoint,
    promote NODE, RELOAD every PgBouncer pointing at it, RESUME (always), then make the old
    primary follow NODE. Any failure before the promotion switches back and changes nothing.
    Ctrl-C, SIGTERM and SIGHUP run the same recovery first, then exit 3; once pg_promote may
    have gone out the old primary is never started again. If this process dies without a word
    (kill -9), a timer on each PgBouncer host RESUMEs it after --pause-limit seconds.

    \b
    Example:
      srht-readonly switchover --to konpaku --dry-run
      srht-readonly switchover --to konpaku --yes
    """
    def run(cluster: Cluster, fleet: Fleet | None, plan: Any) -> SwitchoverResult:
        result = run_switchover(cluster, _the(fleet), plan, say=say)
        _record_primary(cluster, f"switchover --to {to}", to, result.timeline_after,
                        {name: to for name in cluster.inventory.pgbouncers})
        return result

    carry_out(ctx, f"switchover --to {to}", as_json=as_json, dry_run=dry_run, yes=yes, fleet=True, run=run,
              check=lambda cluster, fleet: check_switchover(cluster, _the(fleet), to, max_lag=max_lag * 2**20,
                                                            pause_timeout=pause_timeout, pause_limit=pause_limit))


def _record_primary(cluster: Cluster, command: str, primary: str, timeline: int,
                    pgbouncers: dict[str, str] | None = None) -> None:
    """With ``[etcd]``: the fleet's desired state after ``command`` made ``primary`` the primary (``ops.desired``).
    A failure is a warning: the procedure is done, and the agents also learn from what they see."""
    spec = cluster.inventory.etcd
    if spec is None:
        return
    try:
        state = desired.publish(spec, command, primary=primary, timeline=timeline, pgbouncers=pgbouncers)
    except Refused as exc:
        with contextlib.suppress(OSError):
            click.echo(f"warning: the fleet's state in etcd still names the old primary: {exc}", err=True)
        return
    say(f"fleet state generation {state.generation} written: primary {primary} on timeline {timeline}")


def _the(fleet: Fleet | None) -> Fleet:
    assert fleet is not None, "carry_out(fleet=True) opens one"
    return fleet


class _ProgressBar:
    """The base backup's progress on stderr, created once pg_basebackup reports a total."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.done = 0

    def update(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label="base backup (kB)", file=sys.stderr,
                                         show_pos=True)
            self.bar.__enter__()
        self.bar.length = max(total, done, 1)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


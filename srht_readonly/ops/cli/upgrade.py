"""``srht-readonly upgrade``: the plan's minor, major and host OS upgrade procedures (docs/upgrade.md)."""

from __future__ import annotations

import click

from ..pgupgrade import METHODS
from ..rolling import check_rolling, run_rolling
from ..switchover import MAX_LAG
from ..upgrade import check_major_upgrade, run_major_upgrade
from .commands import _the, carry_out, say
from .options import changing


@click.command()
@click.option("--minor", "minor", metavar="NODE", help="Restart NODE on --bin (same major) while it is the standby.")
@click.option("--bin", "bin_dir", metavar="DIR", help="The new binaries for --minor [default: the node's own].")
@click.option("--host", "host", metavar="NODE", help="Upgrade NODE's host OS while NODE is the standby (--run/--wait).")
@click.option("--run", "command", metavar="COMMAND", help="--host: what upgrades the host, run there by sh (it may "
              "reboot: the host is waited for).")
@click.option("--wait", is_flag=True, help="--host: stop NODE, then wait for you to press Enter.")
@click.option("--all", "every", is_flag=True, help="--minor/--host: then the other node too (the plan's 'repeat').")
@click.option("--major", is_flag=True, help="Major upgrade of the primary with pg_upgrade (needs --to-bin).")
@click.option("--to-bin", metavar="DIR", help="The new major's bindir, on both nodes' hosts (--major).")
@click.option("--method", type=click.Choice(METHODS), default="link", show_default=True,
              help="pg_upgrade's file transfer (--major): link (seconds; fall back on the paused standby), "
                   "clone (reflinks), copy (keeps the old cluster usable; needs the data's size free).")
@click.option("--drop-column-option", "drop_column_options", multiple=True, metavar="KEY",
              help="Remove this non-stock column option from the catalogs in the window (--major; the refusal "
                   "names it when needed). Repeatable.")
@click.option("--max-lag", default=MAX_LAG // 2**20, show_default=True, metavar="MB",
              help="Refuse when the standby is further behind than this.")
@changing
def upgrade(ctx: click.Context, minor: str | None, bin_dir: str | None, host: str | None, command: str | None,
            wait: bool, every: bool, major: bool, to_bin: str | None, method: str,
            drop_column_options: tuple[str, ...], max_lag: int, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Upgrade PostgreSQL or the hosts: --minor NODE, --host NODE, or --major.

    \b
    --minor NODE [--bin DIR] [--all]: the plan's minor upgrade. If NODE is the primary, switch
    over to the standby (no failed write); restart NODE on DIR (same major: refused otherwise),
    wait until it has caught up; with --all the other node too; roles end as they began.
    Without --bin it is a rolling restart.

    \b
    --host NODE (--run COMMAND | --wait) [--all]: the plan's host OS upgrade, the same way round:
    while NODE is the standby, its PostgreSQL and the PgBouncers on its host (same ssh
    destination) are stopped, COMMAND runs there (a reboot is waited for) or you do the work
    and press Enter, then everything starts again and catches up.

    \b
    --major --to-bin DIR: checks first, changing nothing (standby caught up, extensions and
    settings known to the new major, disk, pg_upgrade --check, and a schema-only rehearsal
    upgraded for real in scratch directories). Then the read-only window: fleet to the standby,
    stop the primary, the standby replays its last WAL and pauses (the frozen copy to fall back
    on), pg_upgrade, start on the new major, analyze, sanity check against the standby, fleet
    back, writable. Then the standby is rebuilt on the new major. The window is printed. If
    pg_upgrade fails, everything is put back (exit 1).

    \b
    Example:
      srht-readonly upgrade --minor remilia --bin /usr/lib/postgresql/15/bin --all --yes
      srht-readonly upgrade --host konpaku --run 'apk upgrade && reboot' --all --yes
      srht-readonly upgrade --major --to-bin /usr/lib/postgresql/18/bin --dry-run
      srht-readonly upgrade --major --to-bin /usr/lib/postgresql/18/bin --yes
    """
    if sum(map(bool, (minor, host, major))) != 1:
        raise click.UsageError("say which upgrade: exactly one of --minor NODE, --host NODE, --major")
    if minor or host:
        node = str(minor or host)
        kind = "minor" if minor else "host"
        if host and bool(command) == wait:
            raise click.UsageError("--host needs --run COMMAND or --wait (one of them)")
        carry_out(ctx, f"upgrade --{kind} {node}", as_json=as_json, dry_run=dry_run, yes=yes, fleet=True,
                  check=lambda cluster, fleet: check_rolling(cluster, _the(fleet), node, kind=kind, every=every,
                                                             bin_dir=bin_dir, command=command, wait=wait),
                  run=lambda cluster, fleet, plan: run_rolling(cluster, _the(fleet), plan, say=say, ask=_ask))
        return
    if not to_bin:
        raise click.UsageError("--major needs --to-bin DIR (the new major's bindir)")
    carry_out(ctx, "upgrade --major", as_json=as_json, dry_run=dry_run, yes=yes, fleet=True,
              check=lambda cluster, fleet: check_major_upgrade(
                  cluster, _the(fleet), to_bin, method=method, max_lag=max_lag * 2**20,
                  drop_column_options=drop_column_options, say=say),
              run=lambda cluster, fleet, plan: run_major_upgrade(cluster, _the(fleet), plan, say=say))


def _ask(message: str) -> None:
    """--wait: the operator does the work, then presses Enter (on the terminal, whatever stdin is)."""
    click.prompt(message, default="", show_default=False, prompt_suffix=" ", err=True)

"""``srht-readonly upgrade``: the plan's minor, major and host OS upgrade procedures (docs/upgrade.md)."""

from __future__ import annotations

import click

from ..pgupgrade import METHODS
from ..switchover import MAX_LAG
from ..upgrade import check_major_upgrade, run_major_upgrade
from .commands import _the, carry_out, say
from .options import changing


@click.command()
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
def upgrade(ctx: click.Context, major: bool, to_bin: str | None, method: str, drop_column_options: tuple[str, ...],
            max_lag: int, dry_run: bool, yes: bool, as_json: bool) -> None:
    """Upgrade PostgreSQL: --major (pg_upgrade, read-only window).

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
      srht-readonly upgrade --major --to-bin /usr/lib/postgresql/18/bin --dry-run
      srht-readonly upgrade --major --to-bin /usr/lib/postgresql/18/bin --yes
    """
    if not major:
        raise click.UsageError("say which upgrade: --major")
    if not to_bin:
        raise click.UsageError("--major needs --to-bin DIR (the new major's bindir)")
    carry_out(ctx, "upgrade --major", as_json=as_json, dry_run=dry_run, yes=yes, fleet=True,
              check=lambda cluster, fleet: check_major_upgrade(
                  cluster, _the(fleet), to_bin, method=method, max_lag=max_lag * 2**20,
                  drop_column_options=drop_column_options, say=say),
              run=lambda cluster, fleet, plan: run_major_upgrade(cluster, _the(fleet), plan, say=say))

"""``srht-readonly backup now|status`` and ``srht-readonly past``: the backup engine and the database's past."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict

import click

from .. import render, sql
from ..backup import Barman, parse_time
from ..cluster import Cluster
from ..errors import OpsError
from ..inventory import InventoryError
from ..past import list_past, open_past, stop_past
from .commands import say, session
from .options import failures, option_json


def _barman(cluster: Cluster) -> Barman:
    spec = cluster.inventory.backup
    if spec is None:
        raise InventoryError(cluster.inventory.path, None, "no [backup] section: name your Barman (docs/past.md)")
    return Barman(spec, cluster.host(spec.ssh))


def _primary_dsn(cluster: Cluster) -> str | None:
    """The primary's DSN, for the empty transactions that hurry Barman's archive; None if none answers."""
    for node in cluster.inventory.nodes.values():
        with contextlib.suppress(OpsError):
            if sql.role(node.dsn) == "primary":
                return node.dsn
    return None


@click.group()
def backup() -> None:
    """The backup engine of [backup] (Barman): base backups and the recoverable window.

    \b
    Example:
      srht-readonly backup status
      srht-readonly backup now --json | jq .id
    """


@backup.command("status")
@option_json
@click.pass_context
def backup_status(ctx: click.Context, as_json: bool) -> None:
    """How far into the past the database can be opened: the earliest and latest recoverable time, the base
    backups, the WAL kept, the retention policy, the last success, and what Barman's checks flag."""
    with session(ctx, None, as_json) as cluster, failures(as_json):
        window = _barman(cluster).window()
    click.echo(render.to_json(window) if as_json else window.text())


@backup.command("now")
@option_json
@click.pass_context
def backup_now(ctx: click.Context, as_json: bool) -> None:
    """Take a base backup now (barman backup --wait: done once the WAL it needs is archived)."""
    with session(ctx, "backup now", as_json) as cluster, failures(as_json):
        say("barman backup --wait (pg_basebackup)")
        made = _barman(cluster).backup_now(_primary_dsn(cluster))
    click.echo(json.dumps(asdict(made), indent=2) if as_json else f"base backup {made.id} done at {made.end}")


@click.command()
@click.option("--at", "at", metavar="TIME", help="The moment to open, ISO 8601 (2026-11-30T19:51:40Z; without an "
              "offset: this machine's local time).")
@click.option("--from-snapshot", "snapshot", metavar="DIR", help="Start from this data-directory snapshot (a "
              "mounted ZFS snapshot .zfs/snapshot/NAME): copied first, never started in place.")
@click.option("--list", "listing", is_flag=True, help="Show the instances of the past that exist.")
@click.option("--stop", "stop", is_flag=True, help="Stop and remove the instances given (all without an ID).")
@click.option("--force", is_flag=True, help="Restore even onto a file system holding a node's data directory.")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@option_json
@click.pass_context
def past(ctx: click.Context, at: str | None, snapshot: str | None, listing: bool, stop: bool, force: bool,
         ids: tuple[str, ...], as_json: bool) -> None:
    """Open the database as it was at TIME, in a throwaway read-only instance of its own.

    \b
    --at TIME: Barman restores the newest base backup that ended before TIME into [backup]
    past-dir on its host, PostgreSQL replays WAL to TIME and pauses there (hot standby, read-only).
    The instance has its own port and socket directory, listens on localhost only, has no
    primary_conninfo, no slot, no archiving, and is never in the PgBouncer fleet.
    Prints its URL and the time of the last transaction replayed.
    --from-snapshot DIR [--at TIME]: the same from a copy of a crash-consistent snapshot.
    Refused (exit 1, the window printed): TIME before the earliest recoverable point or in
    the future, past-dir on a node's data volume (without --force), not enough free disk.

    \b
    Example:
      srht-readonly past --at 2026-11-30T19:51:40Z
      psql "$(srht-readonly past --at 2026-11-30T19:51:40Z --json | jq -r .url)" -c 'SELECT count(*) FROM events'
      srht-readonly past --from-snapshot /tank/pg/.zfs/snapshot/daily-2026-11-29
      srht-readonly past --list
      srht-readonly past --stop              # every instance; or past --stop ID
    """
    modes = sum(map(bool, (at or snapshot, listing, stop)))
    if modes != 1:
        raise click.UsageError("say one of --at TIME, --from-snapshot DIR, --list, --stop [ID]")
    if ids and not stop:
        raise click.UsageError("an ID only goes with --stop")
    if listing:
        with session(ctx, None, as_json) as cluster, failures(as_json):
            found = list_past(cluster)
        if as_json:
            click.echo(json.dumps([asdict(i) for i in found], indent=2))
        else:
            click.echo("\n".join(i.text() for i in found) or "no instance of the past")
        return
    if stop:
        with session(ctx, "past --stop", as_json) as cluster, failures(as_json):
            gone = stop_past(cluster, list(ids) or None)
        click.echo(json.dumps({"stopped": gone}) if as_json else
                   (f"stopped and removed: {', '.join(gone)}" if gone else "no instance of the past"))
        return
    with failures(as_json):
        try:
            when = parse_time(at) if at else None
        except ValueError as exc:
            raise click.UsageError(f"--at {at!r}: {exc}") from exc
    with session(ctx, "past", as_json) as cluster, failures(as_json, changing=False):
        instance = open_past(cluster, at=when, snapshot=snapshot, force=force, say=say)
    if as_json:
        click.echo(json.dumps({"id": instance.id, "url": instance.url, "recovered_to": instance.recovered_to,
                               "directory": instance.directory, "seconds": instance.seconds}, indent=2))
    else:
        click.echo(instance.text())
        with contextlib.suppress(OSError):
            click.echo(f"remove it with: srht-readonly past --stop {instance.id}", err=True)

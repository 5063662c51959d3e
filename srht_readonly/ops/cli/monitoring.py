"""The monitoring commands of ``srht-readonly``: ``announce`` (maintenance announcements on every
service host) and ``exporter`` (``status`` as Prometheus metrics, the ``metrics`` extra)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import click

from ..._announcement import Announcement
from .. import announce as announcements
from ..hooks import Hooks
from .commands import session
from .options import EXIT_USAGE, failures, option_json

_RELATIVE = re.compile(r"^\+(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(value: str | None, now: datetime | None = None) -> datetime | None:
    """``--from``/``--until``: ISO 8601 (UTC without a zone), ``now``, or ``+N`` with s, m, h or d after now."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    if value == "now":
        return now.replace(microsecond=0)
    m = _RELATIVE.match(value)
    if m:
        return (now + timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])).replace(microsecond=0)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither ISO 8601 (2026-06-08T10:00Z), 'now' nor +N[smhd]") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@click.command()
@click.argument("message", required=False)
@click.option("--from", "starts", metavar="T", help="Read-only from T (ISO 8601, 'now', +30m); default: at once.")
@click.option("--until", "ends", metavar="T", help="Until T (ISO 8601, +2h); default: until --clear.")
@click.option("--list", "listing", is_flag=True, help="Show each service host's announcement.")
@click.option("--clear", is_flag=True, help="Remove the announcement from every service host.")
@option_json
@click.pass_context
def announce(ctx: click.Context, message: str | None, starts: str | None, ends: str | None, listing: bool,
             clear: bool, as_json: bool) -> None:
    """Announce planned maintenance on every service host ([service NAME] of the inventory).

    Writes the announcement file each host's service processes read (the services' own JSON
    format, docs/monitor.md), atomically, over ssh where the section says ssh =. Before --from
    the services only show MESSAGE; from --from until --until (or --clear) they are read-only,
    and status --check does not page for PgBouncers on the standby.

    \b
    Example:
      srht-readonly announce "Database maintenance, read-only for ~30 min" --from 2026-06-08T10:00Z --until +2h
      srht-readonly announce --list
      srht-readonly announce --clear
    """
    if sum((bool(message), listing, clear)) != 1:
        raise click.UsageError("give exactly one of MESSAGE, --list or --clear")
    if (starts or ends) and not message:
        raise click.UsageError("--from and --until go with MESSAGE")
    now = time.time()
    if listing:
        with session(ctx, None, as_json) as cluster, failures(as_json):
            seen = announcements.read_all(cluster)
        if as_json:
            click.echo(json.dumps([{"service": h.service, "path": h.path, "error": h.error,
                                    "announcement": json.loads(h.announcement.to_json()) if h.announcement else None,
                                    "in_effect": bool(h.announcement and h.announcement.in_effect(now))}
                                   for h in seen], indent=2))
        else:
            for h in seen:
                click.echo(f"{h.service} ({h.path}): "
                           + (f"UNREADABLE: {h.error}" if h.error else announcements.describe(h.announcement, now)))
        return
    if message is not None and not message.strip():
        raise click.UsageError("MESSAGE is empty")
    try:
        announcement = (Announcement(message.strip(), parse_when(starts), parse_when(ends))
                        if message else None)
    except click.BadParameter as exc:
        raise click.UsageError(str(exc.message)) from exc
    command = "announce --clear" if clear else "announce"
    with session(ctx, command, as_json) as cluster:
        hooks = Hooks(cluster.inventory.hooks.command, command_name=command, inventory=cluster.inventory.path)
        try:
            with failures(as_json, changing=True):
                result = (announcements.clear(cluster) if announcement is None
                          else announcements.publish(cluster, announcement))
            hooks.emit("announce", message=announcement.message if announcement else None,
                       starts=announcement.starts.isoformat() if announcement and announcement.starts else None,
                       ends=announcement.ends.isoformat() if announcement and announcement.ends else None,
                       hosts=result.hosts)
        finally:
            hooks.close()
    if as_json:
        click.echo(json.dumps({"ok": True, "action": result.action, "hosts": result.hosts,
                               "announcement": json.loads(announcement.to_json()) if announcement else None}))
    else:
        click.echo(result.text())


@click.command()
@click.option("--listen", default="127.0.0.1:9187", show_default=True, metavar="HOST:PORT",
              help="Where to serve /metrics.")
@click.option("--interval", default=15.0, show_default=True, metavar="S",
              help="Observe the fleet every S seconds (scrapes get the latest observation).")
@click.pass_context
def exporter(ctx: click.Context, listen: str, interval: float) -> None:
    """Serve `status` as Prometheus metrics on HOST:PORT/metrics (needs the metrics extra).

    Every S seconds the fleet is observed as `status` does, and a tiny write is committed and
    timed on the primary (SELECT txid_current() in its own transaction: the commit flushes
    WAL; the median of three, 50-150 ms apart); scrapes read the latest observation. Runs until SIGTERM or Ctrl-C.

    \b
    Example:
      srht-readonly exporter --listen 127.0.0.1:9187 --interval 15
      curl -s http://127.0.0.1:9187/metrics | grep srht_readonly_node_up
    """
    try:
        from ..exporter import FleetExporter
    except ImportError as exc:
        raise click.ClickException(f"the exporter needs prometheus-client: pip install 'srht-readonly[metrics]' "
                                   f"({exc})") from exc
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.UsageError(f"--listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:9187")
    if interval <= 0:
        raise click.UsageError("--interval must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds: the server and connections close
    with session(ctx, None, False) as cluster, FleetExporter(cluster, interval=interval) as fleet_exporter:
        address = fleet_exporter.serve(host.strip("[]") or "0.0.0.0", int(port))
        click.echo(f"serving http://{address[0]}:{address[1]}/metrics (every {interval:g} s)", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            fleet_exporter.wait()


@click.command()
@click.option("--pgbouncer", "pgbouncer", required=True, metavar="NAME",
              help="The [pgbouncer NAME] of the inventory this agent looks after (the one on its host).")
@click.option("--interval", default=0.2, show_default=True, metavar="S", help="Probe every node every S seconds.")
@click.option("--confirm", default=1.0, show_default=True, metavar="S",
              help="Act only after the primary has been unreachable (or back) for S seconds.")
@click.option("--dwell", default=10.0, show_default=True, metavar="S", help="At least S seconds between two switches.")
@click.option("--timeout", default=1.0, show_default=True, metavar="S", help="Bound of each probe's query.")
@click.option("--auto-promote", "auto_promote", type=float, default=None, metavar="AFTER",
              help="Also promote the standby once a majority of agents have seen the primary silent for AFTER "
                   "seconds, by the agent holding the promotion lease, after the [agent] fence command stopped "
                   "the old primary (needs [etcd] and [agent]; off by default; docs/agent.md).")
@click.pass_context
def agent(ctx: click.Context, pgbouncer: str, interval: float, confirm: float, dwell: float, timeout: float,
          auto_promote: float | None) -> None:
    """Beside one PgBouncer: point it at the standby (read-only) when the primary dies, and back.

    Probes the primary and its standby directly every S seconds. When the primary has not
    answered for --confirm seconds and the standby answers and was streaming from it, this
    PgBouncer is pointed at the standby, as `failover` does for one PgBouncer: services serve
    reads and refuse writes with the explanation. When the primary answers again as the primary
    on its timeline (it was not replaced) for --confirm seconds, it is pointed back. It does not
    promote (run `srht-readonly promote` for that; the agent then expects the new primary) unless
    started with --auto-promote, and leaves the PgBouncer alone while it is paused or an operator
    has pointed it elsewhere. With [etcd], it beats there, freezes while etcd has lost its
    quorum, and carries out on its PgBouncer each new fleet state that failover, switchover and
    promote write there (so a failover moves every PgBouncer in parallel).
    Runs in the foreground until SIGTERM or Ctrl-C; logs each decision to stderr and sends it to
    the [hooks] command (event "agent"). One agent per PgBouncer host (docs/agent.md has a
    systemd unit and an OpenRC script).

    \b
    Example:
      srht-readonly --config /etc/sr.ht/readonly.ini agent --pgbouncer bouncer-git
      srht-readonly --config /etc/sr.ht/readonly.ini agent --pgbouncer bouncer-git --auto-promote 5
    """
    from ..agent import Agent

    for flag, value in (("--interval", interval), ("--confirm", confirm), ("--timeout", timeout)):
        if value <= 0:
            raise click.UsageError(f"{flag} must be positive")
    if dwell < 0:
        raise click.UsageError("--dwell must be 0 or more")
    if auto_promote is not None and auto_promote < confirm:
        raise click.UsageError(f"--auto-promote {auto_promote:g} is under --confirm {confirm:g}: the agent promotes "
                               "only after it has taken its PgBouncer to the standby")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with session(ctx, None, False) as cluster, failures(False):
        the_agent = Agent(cluster, pgbouncer, interval=interval, confirm=confirm, dwell=dwell, timeout=timeout,
                          say=lambda line: click.echo(f"srht-readonly agent {pgbouncer}: {line}", err=True),
                          auto_promote=auto_promote)
        promotes = f", auto-promote after {auto_promote:g} s" if auto_promote is not None else ""
        click.echo(f"srht-readonly agent {pgbouncer}: watching (probe every {interval:g} s, confirm {confirm:g} s, "
                   f"dwell {dwell:g} s{promotes})", err=True)
        with contextlib.suppress(KeyboardInterrupt):
            the_agent.run(stop)


__all__ = ["EXIT_USAGE", "agent", "announce", "exporter", "parse_when"]

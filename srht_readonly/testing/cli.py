"""``srht-readonly lab up|down``: the embedded lab in the background, for trying commands on it.

Registered on the ``srht-readonly`` group through the ``srht_readonly.commands`` entry point.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from ..ops.cli.options import option_json
from ..ops.errors import OpsError
from . import lab_agents
from .lab import STATE_FILE, Lab

#: The inventory ``lab up`` writes in the lab's directory, for ``srht-readonly --config``.
INVENTORY_FILE = "inventory.ini"


def default_lab_dir() -> Path:
    return Path(os.environ.get("SRHT_READONLY_LAB_DIR")
                or Path(tempfile.gettempdir()) / f"srht-readonly-lab-{os.geteuid()}")


option_lab_dir = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), default=default_lab_dir,
    show_default="$SRHT_READONLY_LAB_DIR, else $TMPDIR/srht-readonly-lab-$UID",
    help="Directory holding the lab's servers and its lab.json.",
)


@click.group()
def lab() -> None:
    """A local primary, hot standby and PgBouncer on loopback, for trying things out.

    \b
    Example:
      srht-readonly lab up       # start it in the background, print the URLs
      psql "$(srht-readonly lab up --json | jq -r '.servers[2].url')"
      srht-readonly --config "$(srht-readonly lab up --json | jq -r .inventory)" status
      srht-readonly lab up --pg-bin /opt/srht-readonly/postgresql-18/bin   # another PostgreSQL
      srht-readonly lab up --agents   # with etcd and an agent beside the PgBouncer
      srht-readonly lab down     # stop it and remove its directory
    """


@lab.command("up")
@option_lab_dir
@click.option("--pg-bin", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Directory of the PostgreSQL programs the nodes run (default: pg_ctl on $PATH, else the newest "
                   "/usr/lib/postgresql/*/bin); ignored when the lab is already up.")
@click.option("--no-backup", is_flag=True, help="Do not start Barman (backup and past then have nothing to use).")
@click.option("--agents", is_flag=True,
              help="Also start a one-member etcd and `srht-readonly agent` beside each PgBouncer (logs in DIR/agents), "
                   "with [etcd] in the inventory: kill the primary and watch the agent fail its PgBouncer over "
                   "(docs/agent.md). Added to a lab already up.")
@option_json
def lab_up(directory: Path, pg_bin: Path | None, no_backup: bool, agents: bool, as_json: bool) -> None:
    """Start the lab in the background and print each server's role and URL, and an inventory describing it.

    Barman backs up the primary (streaming WAL, a first base backup), for ``backup`` and ``past``."""
    progress = None if as_json else lambda m: click.echo(f"... {m}", err=True)
    if (directory / STATE_FILE).exists():
        the_lab = Lab.attach(directory)
        if any(n.is_running() for n in the_lab.nodes.values()):
            if agents and not lab_agents.running(the_lab.directory):
                lab_agents.stop(the_lab.directory)  # what is left of an earlier --agents
                try:
                    _start_agents(the_lab, progress)
                except RuntimeError as exc:
                    raise click.ClickException(str(exc)) from exc
            _print_lab(_describe(the_lab), as_json, note="already up")
            return
        lab_agents.stop(the_lab.directory)
        the_lab.destroy()
    try:
        the_lab = Lab(directory, pg_bin=pg_bin, backup=not no_backup)
    except OpsError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        the_lab.start(progress=progress)
        if agents:
            _start_agents(the_lab, progress)
    except (OpsError, OSError, RuntimeError) as exc:
        lab_agents.stop(the_lab.directory)
        the_lab.destroy()
        raise click.ClickException(str(exc)) from exc
    _print_lab(_describe(the_lab), as_json, note=f"up in {the_lab.timings['total']:.1f} s")


def _start_agents(the_lab: Lab, progress: Callable[[str], None] | None) -> None:
    """``lab_agents.start``; its ``RuntimeError`` (no etcd, agents that did not start) goes to the caller,
    which stops the lab it has just started."""
    if progress:
        progress("etcd and an agent beside each PgBouncer")
    lab_agents.start(the_lab.directory, Path(str(_describe(the_lab, agents=False)["inventory"])))


@lab.command("down")
@option_lab_dir
def lab_down(directory: Path) -> None:
    """Stop the lab's servers and remove its directory."""
    try:
        the_lab = Lab.attach(directory)
    except OpsError as exc:
        click.echo(str(exc), err=True)
        return
    lab_agents.stop(the_lab.directory)
    the_lab.destroy()
    click.echo(f"lab in {directory} stopped and removed")


def _describe(the_lab: Lab, *, agents: bool = True) -> dict[str, object]:
    """``Lab.describe()`` and the path of an inventory describing the lab (written again: a node's bin may
    have changed since), with ``[etcd]``, ``etcd`` and ``agents`` when ``--agents`` started them."""
    desc: dict[str, object] = dict(the_lab.describe())
    path = the_lab.write_inventory(the_lab.directory / INVENTORY_FILE)
    desc["inventory"] = str(path)
    state = lab_agents.recorded(the_lab.directory) if agents else None
    if state is not None:
        with path.open("a") as f:
            f.write("\n".join(lab_agents.inventory_section(state)) + "\n")
        desc["etcd"] = state["etcd"]["endpoints"]
        desc["agents"] = state["agents"]
    return desc


def _print_lab(desc: dict[str, object], as_json: bool, note: str) -> None:
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    click.echo(f"lab in {desc['directory']} ({note}):")
    for s in desc["servers"]:  # type: ignore[attr-defined]
        click.echo(f"  {s['name']:<10} {s['role']:<22} {s['url']}")
    for name, agent in dict(desc.get("agents") or {}).items():  # type: ignore[call-overload]
        click.echo(f"  agent      beside {name:<15} pid {agent['pid']}, log {agent['log']}")
    if desc.get("etcd"):
        click.echo(f"  etcd       {', '.join(desc['etcd'])}")  # type: ignore[arg-type]
    click.echo(f"inventory: {desc['inventory']}  (srht-readonly --config {desc['inventory']} status)")



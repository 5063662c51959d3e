"""``srht-readonly lab up|down``: the embedded lab in the background, for trying commands on it.

Registered on the ``srht-readonly`` group through the ``srht_readonly.commands`` entry point.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from ..ops.cli.options import option_json
from ..ops.errors import OpsError
from .lab import STATE_FILE, Lab


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
      srht-readonly lab down     # stop it and remove its directory
    """


@lab.command("up")
@option_lab_dir
@option_json
def lab_up(directory: Path, as_json: bool) -> None:
    """Start the lab in the background and print each server's role and URL."""
    if (directory / STATE_FILE).exists():
        the_lab = Lab.attach(directory)
        if any(n.is_running() for n in the_lab.nodes.values()):
            _print_lab(the_lab.describe(), as_json, note="already up")
            return
        the_lab.destroy()
    the_lab = Lab(directory)
    try:
        the_lab.start(progress=None if as_json else lambda m: click.echo(f"... {m}", err=True))
    except (OpsError, OSError) as exc:
        the_lab.destroy()
        raise click.ClickException(str(exc)) from exc
    _print_lab(the_lab.describe(), as_json, note=f"up in {the_lab.timings['total']:.1f} s")


@lab.command("down")
@option_lab_dir
def lab_down(directory: Path) -> None:
    """Stop the lab's servers and remove its directory."""
    try:
        the_lab = Lab.attach(directory)
    except OpsError as exc:
        click.echo(str(exc), err=True)
        return
    the_lab.destroy()
    click.echo(f"lab in {directory} stopped and removed")


def _print_lab(desc: dict[str, object], as_json: bool, note: str) -> None:
    if as_json:
        click.echo(json.dumps(desc, indent=2))
        return
    click.echo(f"lab in {desc['directory']} ({note}):")
    for s in desc["servers"]:  # type: ignore[attr-defined]
        click.echo(f"  {s['name']:<10} {s['role']:<22} {s['url']}")



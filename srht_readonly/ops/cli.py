"""The ``srht-readonly`` command: one click group, each command a thin wrapper over ``ops``.

Exit status: 0 done; 1 refused by a safety check, nothing changed; 2 usage or configuration
error; 3 partly done (the output names each host).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import OpsError, PartlyDone, Refused
from .inventory import InventoryError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

F = TypeVar("F", bound=Callable[..., Any])

option_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
option_yes = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
option_dry_run = click.option("--dry-run", is_flag=True, help="Check and print the plan; change nothing.")


def default_lab_dir() -> Path:
    return Path(os.environ.get("SRHT_READONLY_LAB_DIR")
                or Path(tempfile.gettempdir()) / f"srht-readonly-lab-{os.geteuid()}")


option_lab_dir = click.option(
    "--dir", "directory", type=click.Path(path_type=Path), default=default_lab_dir,
    show_default="$SRHT_READONLY_LAB_DIR, else $TMPDIR/srht-readonly-lab-$UID",
    help="Directory holding the lab's servers and its lab.json.",
)


class Failure(click.ClickException):
    """A package error at the CLI boundary, with its exit status (docs/architecture.md)."""

    def __init__(self, message: str, exit_code: int, label: str, as_json: bool = False,
                 hosts: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class
        self.label = label
        self.as_json = as_json
        self.hosts = hosts or {}

    def show(self, file: Any = None) -> None:
        if self.as_json:
            click.echo(json.dumps({"ok": False, "exit": self.exit_code, "status": self.label,
                                   "error": self.message, "hosts": self.hosts}, indent=2))
        click.echo(f"{self.label}: {self.message}", err=True)


@contextmanager
def failures(as_json: bool = False, *, changing: bool = False) -> Iterator[None]:
    """Turn package errors into exit statuses: refused 1, configuration 2, partly done 3.

    Inside ``changing=True`` (after the plan was accepted) an unexpected error means the
    procedure stopped half-way: exit 3.
    """
    try:
        yield
    except Refused as exc:
        raise Failure(str(exc), EXIT_REFUSED, "refused", as_json) from exc
    except InventoryError as exc:
        raise Failure(str(exc), EXIT_USAGE, "configuration error", as_json) from exc
    except PartlyDone as exc:
        raise Failure(str(exc), EXIT_PARTIAL, "partly done", as_json, exc.hosts) from exc
    except OpsError as exc:
        if changing:
            raise Failure(f"{exc}\nstopped half-way; `srht-readonly status` shows where things are, and running "
                          f"the same command again is safe", EXIT_PARTIAL, "partly done", as_json) from exc
        raise Failure(str(exc), EXIT_REFUSED, "refused", as_json) from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-c", "--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inventory file [default: $SRHT_READONLY_CONFIG, else /etc/sr.ht/readonly.ini].")
@click.option("--ssh-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ssh_config for reaching hosts [default: $SRHT_READONLY_SSH_CONFIG, else ssh's own].")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, config: Path | None, ssh_config: Path | None, verbose: int) -> None:
    """Keep SourceHut's services up through a PostgreSQL failover, and run the plan's procedures.

    Roles are observed, never declared: every command looks at pg_is_in_recovery() first.
    Exit status: 0 done, 1 refused (nothing changed), 2 usage or inventory error,
    3 partly done (the output names each host).

    \b
    Example:
      srht-readonly --config /etc/sr.ht/readonly.ini status
      srht-readonly switchover --to konpaku
    """
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = {"config": config, "ssh_config": ssh_config}


@main.group()
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
    from ..testing.lab import STATE_FILE, Lab

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
    from ..testing.lab import Lab

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


# The procedure commands register themselves on ``main``; commands built on top of ops (the
# drill) come from the ``srht_readonly.commands`` entry-point group, so ops never imports them.
from . import commands  # noqa: E402, F401

for _entry in entry_points(group="srht_readonly.commands"):
    main.add_command(_entry.load(), _entry.name)


def run() -> None:
    """Entry point: package errors become messages, never tracebacks."""
    try:
        main(standalone_mode=True)
    except OpsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)

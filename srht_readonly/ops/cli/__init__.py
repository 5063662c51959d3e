"""The ``srht-readonly`` command: one click group; each command is added here by name.

The operations commands come from ``commands`` (each a thin wrapper over a procedure of
``ops``); the commands built on top of ops (``lab``, ``drill``) come from the
``srht_readonly.commands`` entry-point group, so ``ops`` imports neither ``testing`` nor
``drill``. To add a command: write it in ``commands`` (or in your package, registered in that
entry-point group) and add it below.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import click

from . import commands, monitoring, past, upgrade
from .options import EXIT_PARTIAL, EXIT_REFUSED, EXIT_USAGE, Failure, failures

__all__ = ["EXIT_PARTIAL", "EXIT_REFUSED", "EXIT_USAGE", "Failure", "failures", "main"]


@cache
def _plugins() -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group="srht_readonly.commands")}


class _Group(click.Group):
    """The group, with the entry-point commands imported only when one of them is run (or listed):
    ``drill`` and ``audit`` import far more than an operations command needs, and every command
    is a short-lived process."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _plugins():
            self.add_command(_plugins()[cmd_name].load(), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    3 partly done (the output names each host); status --check: Nagios' 0-3.

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



for _name, _command in (
    ("status", commands.status),
    ("standby", commands.standby),
    ("failover", commands.failover),
    ("promote", commands.promote),
    ("demote", commands.demote),
    ("switchover", commands.switchover),
    ("upgrade", upgrade.upgrade),
    ("backup", past.backup),
    ("past", past.past),
    ("announce", monitoring.announce),
    ("exporter", monitoring.exporter),
    ("agent", monitoring.agent),
):
    main.add_command(_command, _name)

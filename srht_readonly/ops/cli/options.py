"""What every ``srht-readonly`` command shares: exit statuses, options, and package errors turned into both.

Exit status: 0 done; 1 refused by a safety check, nothing changed; 2 usage or configuration
error; 3 partly done (the output names each host).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from ..errors import OpsError, PartlyDone, Refused
from ..interrupts import Interrupted
from ..inventory import InventoryError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

F = TypeVar("F", bound=Callable[..., Any])

option_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
option_yes = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
option_dry_run = click.option("--dry-run", is_flag=True, help="Check and print the plan; change nothing.")


def following(flag: str, metavar: str, help: str, *, force: str) -> Callable[[F], F]:
    """For commands that make NODE follow another node: the NODE argument, ``flag`` naming the node it
    will follow (as ``primary``), ``--force`` (``force`` says what it overrides), and ``changing``."""

    def decorate(fn: F) -> F:
        fn = changing(fn)
        fn = click.option("--force", is_flag=True, help=force)(fn)
        fn = click.option(flag, "primary", required=True, metavar=metavar, help=help)(fn)
        return click.argument("node")(fn)

    return decorate


def changing(fn: F) -> F:
    """The options of every changing command (``--dry-run``, ``--yes``, ``--json``) and the click context."""
    return option_dry_run(option_yes(option_json(click.pass_context(fn))))  # type: ignore[return-value]


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

    Inside ``changing=True`` (after the plan was accepted) an unexpected error, a signal
    (``interrupts.Interrupted``, Ctrl-C) or a command's timeout means the procedure stopped
    half-way: exit 3. Procedures that can put things back do so before the error reaches here.
    """
    try:
        yield
    except Refused as exc:
        raise Failure(str(exc), EXIT_REFUSED, "refused", as_json) from exc
    except InventoryError as exc:
        raise Failure(str(exc), EXIT_USAGE, "configuration error", as_json) from exc
    except PartlyDone as exc:
        raise Failure(str(exc), EXIT_PARTIAL, "partly done", as_json, exc.hosts) from exc
    except (Interrupted, KeyboardInterrupt, subprocess.TimeoutExpired) as exc:
        if not changing:
            raise Failure(f"{_stopped(exc)} before anything was changed", EXIT_REFUSED, "refused", as_json) from exc
        raise Failure(f"{_stopped(exc)} half-way; `srht-readonly status` shows where things are",
                      EXIT_PARTIAL, "partly done", as_json) from exc
    except OpsError as exc:
        if changing:
            raise Failure(f"{exc}\nstopped half-way; `srht-readonly status` shows where things are, and running "
                          f"the same command again is safe", EXIT_PARTIAL, "partly done", as_json) from exc
        raise Failure(str(exc), EXIT_REFUSED, "refused", as_json) from exc




def _stopped(exc: BaseException) -> str:
    if isinstance(exc, Interrupted):
        return f"stopped by {exc.signal}"
    if isinstance(exc, KeyboardInterrupt):
        return "stopped by SIGINT"
    return f"stopped: {exc}"

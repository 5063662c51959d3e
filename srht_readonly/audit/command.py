"""``srht-readonly audit -- COMMAND...``: run a command against the lab's PgBouncer, report its session-level uses."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import click

from ..ops import interrupts
from ..ops.errors import OpsError
from .analyse import Statement, analyse, combine
from .findings import Finding
from .recorder import ServerLog, read_json_lines
from .report import headline, render_json, render_text

__all__ = ["audit", "run_audit"]

# The CLI's exit statuses (ops/cli/options.py), not imported from there: importing ``ops.cli`` loads
# every command of the ``srht_readonly.commands`` entry points, this one included.
EXIT_FOUND = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

#: Where ``sitecustomize.py`` is: put first on the command's ``PYTHONPATH`` for the SQLAlchemy hook.
SITE = Path(__file__).resolve().parent / "_site"
RECORD_ENV = "SRHT_READONLY_AUDIT_RECORD"
ADDRESS_ENV = "SRHT_READONLY_AUDIT_ADDRESS"

Say = Callable[[str], None]


class UsageError(Exception):
    """The audit could not be run as asked (exit 2)."""


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Audit on the lab that `srht-readonly lab up --dir DIR` started (left running). "
                   "[default: a new lab, stopped and removed at the end]")
@click.option("--keep-lab", is_flag=True, help="Leave the new lab running at the end (stop it with "
                                               "`srht-readonly lab down --dir DIR`).")
@click.option("--no-python-hook", is_flag=True, help="Do not put the SQLAlchemy hook in the command's Python "
                                                     "processes: the server log only, no Python frames.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as a JSON list instead of text.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def audit(directory: Path | None, keep_lab: bool, no_python_hook: bool, as_json: bool,
          command: tuple[str, ...]) -> None:
    """Run COMMAND against PgBouncer in transaction mode and report what in it would break there.

    COMMAND (a service's test suite, a script, a stand-in under traffic) finds the lab's
    PgBouncer URL in $DATABASE_URL. While it runs, the lab's primary logs every statement of
    the application's role with its session and transaction, and the command's Python
    processes record SQLAlchemy's statements with their stack frame. Reported: session-level
    SET (and set_config(..., false)), LISTEN, session advisory locks, named prepared
    statements, temporary tables that outlive their transaction, WITH HOLD cursors, DISCARD,
    LOAD; each with where it came from, why it breaks and the fix (docs/audit.md).

    COMMAND's output goes to stderr, with the progress; stdout holds the findings (--json: a
    list). Exit 0 when none was found, 1 when some were, 2 on a usage error (no COMMAND, one
    that cannot be run, no lab), 3 when none was found but COMMAND failed (it may not have run
    all it should have).

    \b
    Example:
      srht-readonly audit -- python my_script.py        # it connects to $DATABASE_URL
      srht-readonly audit --json -- pytest tests/ | jq '.[].kind'
      srht-readonly lab up --dir /tmp/lab && srht-readonly audit --dir /tmp/lab -- ./run-my-service
    """
    say: Say = lambda message: click.echo(f"audit: {message}", err=True)  # noqa: E731
    try:
        with interrupts.exit_on_sigterm():
            findings, statements, status = run_audit(list(command), directory=directory, keep_lab=keep_lab,
                                                     python_hook=not no_python_hook, say=say)
    except UsageError as exc:
        click.echo(f"audit: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(render_json(findings) if as_json else (render_text(findings) or "No session-level use found."))
    say(headline(findings, statements))
    if findings:
        sys.exit(EXIT_FOUND)
    if status != 0:
        say(f"{shlex.join(command)} failed (exit {status}): the audit covers only what it ran")
        sys.exit(EXIT_PARTIAL)


def run_audit(command: list[str], *, directory: Path | None = None, keep_lab: bool = False,
              python_hook: bool = True, say: Say = lambda _m: None,
              stdout: IO[Any] | int | None = None) -> tuple[list[Finding], list[Statement], int]:
    """Run ``command`` on a lab with the recorders on: ``(findings, server-side statements, its exit status)``.

    ``directory``: attach to that running lab (else start one, closed at the end unless
    ``keep_lab``). The command's stdout goes to ``stdout`` (default: this process's stderr).
    """
    with _lab(directory, keep_lab=keep_lab, say=say) as lab:
        assert lab.pgbouncer is not None
        node = lab.node(lab.pgbouncer.target)
        server = ServerLog(node, bouncers=lab.bouncers)
        try:
            server.start()
        except (OpsError, OSError) as exc:
            raise UsageError(f"statement logging could not be turned on at {node.name}: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix="srht-audit-") as scratch:
            record = Path(scratch) / "python.jsonl"
            env = {**os.environ, "DATABASE_URL": lab.pgbouncer.url}
            if python_hook:
                env[RECORD_ENV] = str(record)
                env[ADDRESS_ENV] = f"{lab.pgbouncer.host}:{lab.pgbouncer.port}"
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
            try:
                say(f"statement logging on at {node.name} ({server.path}); running {shlex.join(command)} "
                    f"with DATABASE_URL={lab.pgbouncer.url}")
                started = time.monotonic()
                try:
                    status = subprocess.run(command, env=env, stdout=_stdout(stdout), check=False).returncode
                except (FileNotFoundError, PermissionError) as exc:
                    raise UsageError(f"cannot run {shlex.join(command)}: {exc}") from exc
                say(f"{command[0]} exited {status} after {time.monotonic() - started:.1f} s")
                statements = server.statements()
            finally:
                server.stop()
            python = read_json_lines(record)
    return combine(analyse(python), analyse(statements), python), statements, status


@contextlib.contextmanager
def _lab(directory: Path | None, *, keep_lab: bool, say: Say) -> Iterator[Any]:
    """The lab in ``directory`` (left as it is), or a new one (closed at the end unless ``keep_lab``)."""
    from ..testing.lab import Lab

    if directory is not None:
        try:
            lab = Lab.attach(directory)
        except OpsError as exc:
            raise UsageError(str(exc)) from exc
        if lab.pgbouncer is None or not lab.nodes[lab.pgbouncer.target].is_running():
            raise UsageError(f"the lab in {directory} is not running (start it with: srht-readonly lab up --dir "
                             f"{directory})")
        say(f"on the lab in {directory}")
        yield lab
        return
    lab = Lab()
    try:
        say("starting a lab: primary, hot standby, PgBouncer (transaction mode)")
        try:
            lab.start(progress=lambda m: say(f"  {m}"))
        except (OpsError, OSError) as exc:
            raise UsageError(f"the lab could not start: {exc}") from exc
        yield lab
    finally:
        if keep_lab and lab.pgbouncer is not None:
            say(f"lab left running in {lab.directory}; stop it with: srht-readonly lab down --dir {lab.directory}")
        else:
            lab.close()


def _stdout(stdout: IO[Any] | int | None) -> IO[Any] | int | None:
    if stdout is not None:
        return stdout
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor (click's test runner)
        return None

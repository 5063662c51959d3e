"""``srht-readonly drill``: the plan's mock contingency scenarios, played and reported."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..ops import interrupts
from ..ops.cli.options import EXIT_REFUSED, EXIT_USAGE, Failure, failures
from ..ops.errors import Refused
from ..ops.inventory import InventoryError
from . import report as report_mod
from .live import LiveDisplay, summary_table
from .runner import LOADS, run
from .sabotage import SABOTAGES
from .scenarios import SCENARIOS
from .session import Setting, deployment, local

NAMES = [s.name for s in SCENARIOS]
#: Where scripts/bootstrap installs PostgreSQL 18 (the local drill's major-upgrade goes there).
DEFAULT_MAJOR_BIN = Path(os.environ.get("SRHT_READONLY_PG18", "/opt/srht-readonly/postgresql-18")) / "bin"


def default_scenarios(major_bin: str | None, past: bool, throttle: bool = True) -> list[str]:
    """The scenarios played without --scenario: every default one; major-upgrade only with a new major,
    past-data only with a backup engine, soft-outage only where the nodes run on this machine."""
    return [s.name for s in SCENARIOS if s.default and (s.name != "major-upgrade" or major_bin)
            and (s.name != "past-data" or past) and (s.name != "soft-outage" or throttle)]


@click.command()
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(NAMES), metavar="NAME",
              help=f"Play only this scenario (repeatable): {', '.join(NAMES)}. [default: all but "
                   "rolling-restart, in this order]")
@click.option("--duration", default=8.0, show_default=True, metavar="SECONDS",
              help="How long each scenario holds a state (before, during and after each step).")
@click.option("--load", "load_name", type=click.Choice(list(LOADS)), default="typical", show_default=True,
              help="Traffic: typical, or excessive (many more clients, no pauses).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("drill-report"), show_default=True,
              help="Directory for index.html, report.json and drill.log.")
@click.option("--no-services", is_flag=True, help="Local drill: database traffic only (no web, ssh, builds, "
                                                  "celery stand-ins; these need root and the drill extra).")
@click.option("--sabotage", type=click.Choice(list(SABOTAGES)), metavar="NAME",
              help="Test the drill itself: break one part on purpose and play only the scenario that exercises "
                   f"it; the drill must fail (exit 1) naming the expectation that caught it. {', '.join(SABOTAGES)}.")
@click.option("--pg-bin", metavar="DIR", default=None,
              help="Local drill: the lab's PostgreSQL binaries [default: Debian's newest, as `lab up`]. With a "
                   "major other than 15 the major-upgrade scenario is left out unless --major-bin is given.")
@click.option("--major-bin", metavar="DIR", default=None,
              help="Local drill: the new major's bindir for major-upgrade [default: PostgreSQL 18 where "
                   "scripts/bootstrap installs it, $SRHT_READONLY_PG18/bin]. With --config: [drill] major-to-bin.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def drill(ctx: click.Context, scenarios: tuple[str, ...], duration: float, load_name: str, report_dir: Path,
          no_services: bool, sabotage: str | None, pg_bin: str | None, major_bin: str | None,
          as_json: bool) -> None:
    """Play failover scenarios under traffic and record what every service did.

    Without --config: on a fresh embedded lab (primary, hot standby, PgBouncer on loopback)
    with the stand-in services (git.sr.ht web and SSH pipeline, build runner, Celery webhook
    worker), all started here and all stopped at the end. With --config (given explicitly;
    $SRHT_READONLY_CONFIG is not used here): against the inventory's hosts, with its [drill]
    traffic and [probe NAME] probes (docs/drill.md). It kills and promotes servers: never
    point it at production.

    Scenarios: planned switchover; read-only failover then promotion (the plan's path);
    primary killed (kill -9), failover, promotion, pg_rewind rejoin; standby killed and caught
    up; host OS upgrade of each node in turn (upgrade --host --all); the database opened as it
    was at a moment between two bursts of writes (past --at, Barman); a soft outage (the primary's
    processes throttled with cgroups: slow, not down; nodes on this machine only); last, major-upgrade
    (upgrade --major, 15 to 18 on the lab; the lab ends on the new major). Only when named:
    rolling-restart (upgrade --minor, same binaries); unattended-crash (an agent beside every
    PgBouncer, kill -9 of the primary, no operator step until the promotion); unattended-promote
    (the same with the agents' --auto-promote 3: no operator step at all; embedded lab only, where
    the drill starts an etcd and writes the fence). Each starts from, and ends with, a primary with
    a streaming standby and every PgBouncer on the primary.

    Writes a report (index.html with a timeline per scenario, report.json, drill.log) and
    prints a summary. Exit 0 when every expectation held, 1 when some did not, 2 when the
    drill could not start (inventory, services, lab).

    --sabotage tests the drill: no-resume (a switchover leaves a PgBouncer paused),
    slow-login-retry (the failover leaves server_login_retry at 15 s), web-500, store-keys and
    no-backoff (the web front, the SSH pipeline or the build runner without their read-only
    handling; embedded lab only). Each must fail its drill.

    \b
    Example:
      srht-readonly drill                                   # everything, about 4 minutes
      srht-readonly drill --scenario switchover --duration 3 --json | jq '.scenarios[0].passed'
      srht-readonly drill --sabotage no-resume --duration 3  # must fail, exit 1
      srht-readonly --config /etc/sr.ht/drill.ini drill --scenario readonly-failover
    """
    config = ctx.obj["config"]
    names = list(scenarios)
    if sabotage is not None:
        names = _sabotaged(sabotage, scenarios, local=config is None and not no_services)
    live = LiveDisplay()
    verbose = ctx.find_root().params.get("verbose", 0)
    started = time.monotonic()
    log = None if verbose else report_dir / "drill.log"
    with interrupts.exit_on_sigterm(), _logs_to(log) as log_file, failures(as_json):
        where = (deployment(config, ssh_config=ctx.obj["ssh_config"], sabotage=sabotage) if config is not None
                 else local(load_name=load_name, duration=duration, services=not no_services, sabotage=sabotage,
                            pg_bin=pg_bin, major_bin=major_bin or (None if pg_bin else str(DEFAULT_MAJOR_BIN)),
                            backup=not names or "past-data" in names, say=live.say))
        try:
            result = _play(where, names, duration=duration, load_name=load_name, live=live, as_json=as_json)
        finally:
            live.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    if sabotage is not None:
        result["sabotage"] = _caught(sabotage, result)
    page = report_mod.write(result, report_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(summary_table(result))
    verdict = "every expectation held" if result["passed"] else "SOME EXPECTATIONS FAILED"
    if sabotage is not None:
        click.echo(_sabotage_line(result["sabotage"]), err=True)
    logs = f"; services' and procedures' log: {log_file}" if log_file else ""
    click.echo(f"drill: {verdict} ({result['seconds']:.0f} s); report: {page}{logs}", err=True)
    sys.exit(0 if result["passed"] else EXIT_REFUSED)


def _sabotaged(name: str, scenarios: tuple[str, ...], *, local: bool) -> list[str]:
    """The one scenario sabotage ``name`` plays; a usage error where it cannot be played."""
    sabotage = SABOTAGES[name]
    if scenarios and list(scenarios) != [sabotage.scenario]:
        raise click.UsageError(f"--sabotage {name} plays the {sabotage.scenario} scenario only; "
                               "leave out --scenario")
    if sabotage.services and not local:
        raise click.UsageError(f"--sabotage {name} breaks a stand-in service: it needs the embedded lab with its "
                               "services (no --config, no --no-services)")
    return [sabotage.scenario]


def _caught(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Sabotage ``name`` in the report: the failed expectations; is the expected one among them?"""
    sabotage = SABOTAGES[name]
    failed = [e["text"] for s in result["scenarios"] for e in s["expectations"] if not e["passed"]]
    return {"name": name, "what": sabotage.what, "expected": sabotage.caught_by, "caught": failed,
            "caught_by_expected": any(t.startswith(sabotage.caught_by) for t in failed)}


def _sabotage_line(caught: dict[str, Any]) -> str:
    head = f"sabotage {caught['name']} ({caught['what']}): "
    expected = [t for t in caught["caught"] if t.startswith(caught["expected"])]
    if not expected:
        return head + f"NOT CAUGHT by '{caught['expected']}'" + (
            f"; failed instead: {', '.join(caught['caught'])}" if caught["caught"] else "; the drill passed")
    more = len(caught["caught"]) - 1
    return head + f"caught by '{expected[0]}'" + (f" and {more} more expectation(s)" if more else "")


def _play(where: contextlib.AbstractContextManager[Setting], names: list[str], *, duration: float, load_name: str,
          live: LiveDisplay, as_json: bool) -> dict[str, Any]:
    """Set up (a failure there is exit 2: nothing was drilled), play every scenario, tear down."""
    with contextlib.ExitStack() as stack:
        try:
            setting = stack.enter_context(where)
        except (InventoryError, Refused):
            raise  # exit 2 and exit 1 with their own messages (see ops.cli.options.failures)
        except Exception as exc:  # the lab or a service cannot start: not root, a missing program or package
            raise Failure(f"the drill could not start: {type(exc).__name__}: {exc}", EXIT_USAGE,
                          "drill not started", as_json) from exc
        live.say(f"drill on {setting.environment}")
        if not names:
            names = default_scenarios(setting.major_bin, setting.past, setting.throttle)
            live.say("rolling-restart, unattended-crash and unattended-promote are played only when named "
                     "(--scenario)")
            if "past-data" not in names:
                live.say("past-data left out: no backup engine ([backup] in the inventory)")
            if "soft-outage" not in names:
                live.say("soft-outage left out: it throttles the primary's processes with cgroups on this machine, "
                         "and some nodes of the inventory run on other hosts (ssh =)")
        return run(setting.fleet, names, duration=duration, load=load_name, sources=setting.sources,
                   progress=live, environment=setting.environment)


@contextlib.contextmanager
def _logs_to(path: Path | None) -> Iterator[Path | None]:
    """While the drill runs, log lines go to ``path`` (if given), so stderr shows the progress only."""
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    kept = list(root.handlers)
    for old in kept:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        for old in kept:
            root.addHandler(old)

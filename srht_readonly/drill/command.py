"""``srht-readonly drill``: the plan's mock contingency scenarios, played and reported."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import click

from ..ops.cli import EXIT_REFUSED, failures, main
from . import report as report_mod
from .live import LiveDisplay, summary_table
from .runner import LOADS, run
from .scenarios import SCENARIOS
from .session import deployment, local

NAMES = [s.name for s in SCENARIOS]


@main.command()
@click.option("--scenario", "scenarios", multiple=True, type=click.Choice(NAMES), metavar="NAME",
              help=f"Play only this scenario (repeatable): {', '.join(NAMES)}. [default: all, in this order]")
@click.option("--duration", default=8.0, show_default=True, metavar="SECONDS",
              help="How long each scenario holds a state (before, during and after each step).")
@click.option("--load", "load_name", type=click.Choice(list(LOADS)), default="typical", show_default=True,
              help="Traffic: typical, or excessive (many more clients, no pauses).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("drill-report"), show_default=True, help="Directory for index.html and report.json.")
@click.option("--no-services", is_flag=True, help="Local drill: database traffic only (no web, ssh, builds, "
                                                  "celery stand-ins).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_context
def drill(ctx: click.Context, scenarios: tuple[str, ...], duration: float, load_name: str, report_dir: Path,
          no_services: bool, as_json: bool) -> None:
    """Play failover scenarios under traffic and record what every service did.

    Without --config: on a fresh embedded lab (primary, hot standby, PgBouncer on loopback)
    with the stand-in services (git.sr.ht web and SSH pipeline, build runner, Celery webhook
    worker), all started here and all stopped at the end. With --config: against the
    inventory's real hosts, its [drill] traffic and [probe NAME] probes (docs/drill.md).

    Scenarios: planned switchover; read-only failover then promotion (the plan's path);
    primary killed (kill -9), failover, promotion, pg_rewind rejoin; standby killed and caught
    up; minor upgrade (switch over, restart, switch back). Each ends with a primary and a
    streaming standby, possibly swapped.

    Writes a report (index.html with a timeline per scenario, report.json) and prints a
    summary. Exit 0 only when every expectation held, 1 otherwise.

    \b
    Example:
      srht-readonly drill                                   # everything, ~4 minutes
      srht-readonly drill --scenario switchover --duration 3 --json | jq '.scenarios[0].passed'
      srht-readonly --config /etc/sr.ht/readonly.ini drill --scenario readonly-failover
    """
    names = list(scenarios) or NAMES
    # A drill killed with SIGTERM (a CI timeout, systemd) still stops every server it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    config = ctx.obj["config"]
    live = LiveDisplay()
    say = live.say
    log_file = _log_to_file(report_dir / "drill.log") if ctx.find_root().params.get("verbose", 0) == 0 else None
    started = time.monotonic()
    with failures(as_json):
        where = (deployment(config, ssh_config=ctx.obj["ssh_config"]) if config is not None
                 else local(load_name=load_name, duration=duration, services=not no_services, say=say))
        try:
            with where as setting:
                say(f"drill on {setting.environment}")
                result = run(setting.fleet, names, duration=duration, load=load_name, sources=setting.sources,
                             progress=live, environment=setting.environment)
        finally:
            live.stop()
    result["seconds"] = round(time.monotonic() - started, 1)
    page = report_mod.write(result, report_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        click.echo(summary_table(result))
    verdict = "every expectation held" if result["passed"] else "SOME EXPECTATIONS FAILED"
    logs = f"; services' and procedures' log: {log_file}" if log_file else ""
    click.echo(f"drill: {verdict} ({result['seconds']:.0f} s); report: {page}{logs}", err=True)
    sys.exit(0 if result["passed"] else EXIT_REFUSED)


def _log_to_file(path: Path) -> Path:
    """Send warnings of the services and procedures to ``path``, so stderr shows the progress only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    return path

"""``python -m integrations.drill.exercise``: the stand-ins under the drill's traffic, against ``$DATABASE_URL``.

What ``srht-readonly audit`` runs to audit the stand-in services (docs/audit.md)::

    srht-readonly audit -- python -m integrations.drill.exercise                 # all four
    srht-readonly audit -- python -m integrations.drill.exercise --services web  # the web front only

It sets the chosen services up as the drill does (``LocalServices``, or only the web front, which
needs neither root, sshd, Redis nor Celery), sends their users' traffic until every kind of
operation of every service has worked at least once and ``--seconds`` have passed, and prints
what the users saw. Exit 0 when every operation worked, 1 when one did not or a kind never ran
within ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from integrations.webhooks.schema import connect
from srht_readonly.drill import Outcome, Recorder
from srht_readonly.drill.runner import TrafficSource
from srht_readonly.drill.services import DrillEnvironment

from . import LocalServices
from .web import WebTraffic

SERVICES = ("web", "ssh", "builds", "celery")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default=",".join(SERVICES),
                        help=f"comma-separated: all of {','.join(SERVICES)} (the default), or web alone")
    parser.add_argument("--seconds", type=float, default=3.0, help="send traffic at least this long")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a kind never run by then")
    parser.add_argument("--load", choices=("typical", "excessive"), default="typical")
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.services.split(",") if s.strip()]
    if sorted(wanted) not in (sorted(SERVICES), ["web"]):
        parser.error(f"--services: all of {','.join(SERVICES)}, or web alone")
    url = os.environ.get("DATABASE_URL")
    if not url:
        parser.error("$DATABASE_URL must name the database (through PgBouncer)")
    with tempfile.TemporaryDirectory(prefix="srht-exercise-") as scratch, contextlib.ExitStack() as stack:
        env = DrillEnvironment(url, Path(scratch), args.load, duration=args.seconds)
        sources: Sequence[TrafficSource]
        if wanted == ["web"]:
            engine = connect(url)
            try:
                sources = [WebTraffic(env, stack, engine)]
            finally:
                engine.dispose()
        else:
            local = LocalServices(env)
            stack.callback(local.close)
            sources = local.sources
        return _drive(sources, seconds=args.seconds, timeout=args.timeout)


def _drive(sources: Sequence[TrafficSource], *, seconds: float, timeout: float) -> int:
    recorder = Recorder()
    wanted = {(s.name, kind) for s in sources for kind in s.kinds}
    started = time.monotonic()
    for source in sources:
        source.start(recorder)
    try:
        while True:
            worked = {(e.service, e.op) for e in recorder.events if e.outcome is Outcome.OK}
            elapsed = time.monotonic() - started
            if (wanted <= worked and elapsed >= seconds) or elapsed > timeout:
                break
            time.sleep(0.1)
    finally:
        for source in sources:
            source.stop()
        recorder.wait_idle(10)
    for service, counts in sorted(recorder.counts().items()):
        print(f"{service}: " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    failed = [e for e in recorder.events if e.outcome is not Outcome.OK]
    missing = wanted - {(e.service, e.op) for e in recorder.events if e.outcome is Outcome.OK}
    for e in failed[:10]:
        print(f"not ok: {e.service} {e.op}: {e.outcome} {e.detail}", file=sys.stderr)
    if missing:
        print(f"never worked within {timeout:g} s: {', '.join(sorted(f'{s} {k}' for s, k in missing))}",
              file=sys.stderr)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())

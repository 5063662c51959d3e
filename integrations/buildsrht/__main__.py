"""Command line of the build-runner stand-in (see docs/builds.md)::

    python -m integrations.buildsrht --database URL init
    python -m integrations.buildsrht --database URL submit manifest.json     # prints the job id
    python -m integrations.buildsrht --database URL run JOB_ID [--deadline SECONDS]

``run`` prints the result as JSON and exits 0 on success, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from srht_readonly import ReadOnlyMonitor
from srht_readonly.sqlalchemy import instrument

from . import schema
from .runner import BuildRunner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integrations.buildsrht", description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="connection URL, e.g. postgresql://srht@127.0.0.1:16432/srht")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init", help="create the tables")
    submit = commands.add_parser("submit", help="queue a job from a JSON manifest")
    submit.add_argument("manifest", type=Path)
    run = commands.add_parser("run", help="run a queued job")
    run.add_argument("job_id", type=int)
    run.add_argument("--deadline", type=float, default=45 * 60, help="seconds for the whole build (default 2700)")
    run.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = schema.connect(args.database)
    if args.command == "init":
        schema.create(engine)
        return 0
    if args.command == "submit":
        with engine.begin() as conn:
            print(schema.submit(conn, json.loads(args.manifest.read_text())))
        return 0
    monitor = ReadOnlyMonitor(engine)
    instrument(engine, monitor)
    runner = BuildRunner(engine, deadline=args.deadline, workdir=args.workdir, monitor=monitor)
    result = runner.run(args.job_id)
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0 if result.status == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

"""How soon reads come back after the primary is killed, with an agent beside every PgBouncer.

One lab: a primary, a hot standby and three PgBouncers (one reached over a real sshd), an
``srht-readonly agent`` process beside each, a reader per PgBouncer running ``SELECT 1`` in a
loop. Each round ``kill -9``'s the primary, measures per PgBouncer the seconds from the kill to
the end of the longest stretch without a good read (reads fail or wait in PgBouncer, then work
on the standby; no operator command anywhere), then starts the primary again and waits until
every agent has pointed its PgBouncer back and the standby streams again. Printed: the median
and the max over rounds of the slowest PgBouncer (goal: median 1.5 s, max under 2 s), and that
nothing was promoted.

    .venv/bin/python benchmarks/agent_failover.py [--rounds 10] [--confirm 1.0] [--json]

Not a test: it asserts nothing about time; it exits 1 if a round never got reads back, or a
node was promoted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srht_readonly.ops import sql  # noqa: E402
from srht_readonly.testing import Lab  # noqa: E402
from srht_readonly.testing.agents import Agents, reads_restored, start_again  # noqa: E402
from srht_readonly.testing.deployment import build_fleet  # noqa: E402
from srht_readonly.testing.load import ReadProbe  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--confirm", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    promoted = False
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="srht-agent-bench-") as tmp:
        fleet = build_fleet(lab)
        primary, standby = lab.nodes["remilia"], lab.nodes["konpaku"]
        with Agents(fleet, Path(tmp), "--dwell", "1", "--confirm", str(args.confirm)) as agents:
            agents.wait_for("expect:", timeout=30)
            for i in range(args.rounds):
                with ReadProbe([b.dsn for b in lab.bouncers]) as reads:
                    time.sleep(0.5)
                    killed = time.monotonic()
                    primary.kill()
                    try:
                        agents.wait_for("away:", timeout=10, times=i + 1)
                    except AssertionError as exc:
                        print(exc, file=sys.stderr)
                    time.sleep(0.5)
                    restored = reads_restored(reads, killed)
                promoted = promoted or sql.role(standby.admin_dsn) != "standby"
                start_again(primary)
                agents.wait_for("back:", timeout=30, times=i + 1)
                # The standby streams again before the next kill: the agents rightly refuse a standby that
                # was not streaming (its WAL receiver retries every wal_retrieve_retry_interval, 5 s).
                sql.wait_until(lambda: sql.query(standby.admin_dsn, "SELECT 1 FROM pg_stat_wal_receiver "
                                                                    "WHERE status = 'streaming'"),
                               timeout=30, what="the standby streaming again")
                rounds.append({"round": i + 1, "restored_s": [None if r is None else round(r, 3) for r in restored]})
                if not args.json:
                    print(f"round {i + 1}: reads back after {rounds[-1]['restored_s']} s", file=sys.stderr)
    worst = [max(r["restored_s"]) if None not in r["restored_s"] else None for r in rounds]
    done = [w for w in worst if w is not None]
    summary = {"rounds": rounds, "confirm_s": args.confirm, "promoted": promoted,
               "never_restored": len(worst) - len(done),
               "slowest_pgbouncer_median_s": round(statistics.median(done), 3) if done else None,
               "slowest_pgbouncer_max_s": round(max(done), 3) if done else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"kill -9 to reads through every PgBouncer, {len(rounds)} rounds (confirm {args.confirm:g} s): "
              f"median {summary['slowest_pgbouncer_median_s']} s, max {summary['slowest_pgbouncer_max_s']} s; "
              f"never restored: {summary['never_restored']}; promoted: {promoted}")
    return 1 if summary["never_restored"] or promoted else 0


if __name__ == "__main__":
    sys.exit(main())

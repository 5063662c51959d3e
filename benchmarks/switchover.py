"""How long a planned switchover stops writes: ``srht-readonly switchover`` vs the bare sequence.

One run, one lab: a primary, a hot standby and three PgBouncers (one reached over a real sshd),
8 clients committing INSERTs through them. Each round switches the primary twice: once with the
CLI (a subprocess, as an operator runs it: inventory, checks, lock, PAUSE, fast stop, replay
proof, promotion, RELOAD, RESUME, demotion), once with the bare sequence docs/facts.md measured
at 0.33 s (PAUSE every PgBouncer -> ``pg_ctl stop -m fast -w`` -> ``pg_controldata`` -> wait for
replay -> ``pg_promote(true)`` -> rewrite configs + RELOAD -> RESUME), written with the same ops
primitives and no polish. Rounds alternate which one goes first and in which direction.

The figure is what clients saw: the longest time one client waited between two acknowledged
writes around the switch (``gap``), its median over rounds, and the ratio CLI / bare (goal:
<= 1.5). Failed transactions and lost acknowledged writes are counted for both.

    .venv/bin/python benchmarks/switchover.py [--rounds 3] [--json]

Not a test: it asserts nothing about time; it exits 1 if a write failed or was lost.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srht_readonly.ops import replication, sql  # noqa: E402
from srht_readonly.ops.pgbouncer import repoint  # noqa: E402
from srht_readonly.testing import Lab  # noqa: E402
from srht_readonly.testing.deployment import LabFleet, build_fleet  # noqa: E402
from srht_readonly.testing.load import WriteLoad  # noqa: E402


def bare_switchover(fleet: LabFleet, old: str, new: str) -> float:
    """The bare sequence; returns its own write pause (PAUSE sent -> RESUME done)."""
    lab = fleet.lab
    admins = [b.admin for b in lab.bouncers]
    with concurrent.futures.ThreadPoolExecutor(len(admins)) as pool:
        t0 = time.monotonic()
        list(pool.map(lambda a: a.pause(), admins))
        try:
            lab.nodes[old].server.stop("fast")
            control = lab.nodes[old].server.controldata()
            assert control["Database cluster state"] == "shut down", control
            replication.wait_replayed(lab.nodes[new].admin_dsn, control["Latest checkpoint location"])
            replication.promote(lab.nodes[new].admin_dsn)
            for b in lab.bouncers:
                b.config_path.write_text(repoint(b.config_path.read_text(), lab.nodes[new].target))
            list(pool.map(lambda a: a.reload(), admins))
        finally:
            list(pool.map(lambda a: a.resume(), admins))
            pause = time.monotonic() - t0
    for b in lab.bouncers:
        b.target = new
    # Not measured: the old primary follows the new one again.
    replication.ensure_slot(lab.nodes[new].admin_dsn, old)
    lab.configure_as_standby(lab.nodes[old], lab.nodes[new])
    lab.nodes[old].start()
    replication.wait_streaming(lab.nodes[old].admin_dsn)
    replication.drop_slot(lab.nodes[old].admin_dsn, new)
    return pause


def cli_switchover(fleet: LabFleet, old: str, new: str) -> float:
    proc = fleet.cli("switchover", "--to", new, "--yes", "--json")
    if proc.returncode != 0:
        raise SystemExit(f"srht-readonly switchover failed:\n{proc.stdout}\n{proc.stderr}")
    return float(json.loads(proc.stdout)["write_pause"])


def measure(fleet: LabFleet, how: str, old: str, new: str) -> dict[str, Any]:
    """One switch from ``old`` to ``new`` under 8 writers."""
    WriteLoad.create_table(fleet.lab.nodes[old].dsn)
    load = WriteLoad([b.dsn for b in fleet.lab.bouncers], clients=8)
    load.start()
    time.sleep(1.0)
    start = time.monotonic()
    pause = (cli_switchover if how == "cli" else bare_switchover)(fleet, old, new)
    end = time.monotonic()
    time.sleep(0.5)
    report = load.stop()
    assert sql.role(fleet.lab.nodes[new].admin_dsn) == "primary"
    return {
        "how": how, "from": old, "to": new,
        "gap": report.longest_gap(start, end), "fleet_gap": report.fleet_gap(start, end), "pause": pause,
        "failed": len(report.failures), "lost": len(report.lost(fleet.lab.nodes[new].dsn)),
        "acknowledged": report.acknowledged,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the raw measurements as JSON")
    args = parser.parse_args()
    runs = []
    with Lab() as lab:
        fleet = build_fleet(lab)
        primary, standby = "remilia", "konpaku"
        for i in range(args.rounds):
            order = ("cli", "bare") if i % 2 == 0 else ("bare", "cli")
            for how in order:
                runs.append(measure(fleet, how, primary, standby))
                primary, standby = standby, primary
                r = runs[-1]
                print(f"round {i + 1} {how:<4} {r['from']} -> {r['to']}: client gap {r['gap']:.3f} s, fleet gap "
                      f"{r['fleet_gap']:.3f} s, pause {r['pause']:.3f} s, {r['failed']} failed, {r['lost']} lost",
                      file=sys.stderr)
    cli = [r for r in runs if r["how"] == "cli"]
    bare = [r for r in runs if r["how"] == "bare"]
    summary = {
        "rounds": args.rounds,
        "cli_gap_median": statistics.median(r["gap"] for r in cli),
        "bare_gap_median": statistics.median(r["gap"] for r in bare),
        "cli_pause_median": statistics.median(r["pause"] for r in cli),
        "bare_pause_median": statistics.median(r["pause"] for r in bare),
        "failed": {"cli": sum(r["failed"] for r in cli), "bare": sum(r["failed"] for r in bare)},
        "lost": {"cli": sum(r["lost"] for r in cli), "bare": sum(r["lost"] for r in bare)},
    }
    summary["ratio"] = summary["cli_gap_median"] / summary["bare_gap_median"]
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}, indent=2))
    else:
        print(f"longest write gap seen by a client, median of {args.rounds} rounds, 8 writers, 3 PgBouncers:")
        print(f"  srht-readonly switchover  {summary['cli_gap_median']:.3f} s  "
              f"(its own PAUSE->RESUME {summary['cli_pause_median']:.3f} s)")
        print(f"  bare PAUSE/promote/RESUME {summary['bare_gap_median']:.3f} s  "
              f"(its own PAUSE->RESUME {summary['bare_pause_median']:.3f} s)")
        print(f"  ratio CLI / bare          {summary['ratio']:.2f}  (goal <= 1.5)")
        print(f"  failed transactions       CLI {summary['failed']['cli']}, bare {summary['failed']['bare']}")
        print(f"  lost acknowledged writes  CLI {summary['lost']['cli']}, bare {summary['lost']['bare']}")
    return 1 if any(summary["failed"].values()) or any(summary["lost"].values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.TimeoutExpired as exc:
        sys.exit(f"timed out: {exc}")

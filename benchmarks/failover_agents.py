"""``failover`` with and without the agents: how long the switch of every PgBouncer takes each way.

One lab: a primary, a hot standby and three PgBouncers (one reached over a real sshd). First
without ``[etcd]``: ``srht-readonly failover --to konpaku`` then ``--to remilia``, ``--rounds`` times
(the command writes every config and reloads every PgBouncer itself). Then with a one-member
etcd and an ``srht-readonly agent`` beside each PgBouncer: the same commands write the fleet's
desired state and the agents repoint their own PgBouncers (``ops.desired``).

Printed: per way, the median and max of the command's wall-clock time and of the switch it
reports (its ``seconds``: from the first write to every PgBouncer verified), the agents'
own times (state written to each heartbeat reporting it), how many PgBouncers the command
had to repoint itself, and the ratio of the medians (with agents / without)::

    .venv/bin/python benchmarks/failover_agents.py [--rounds 10] [--json]

Not a test: it asserts nothing about time; it exits 1 when a failover fails.
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

from srht_readonly.testing import Lab  # noqa: E402
from srht_readonly.testing.agents import Agents  # noqa: E402
from srht_readonly.testing.deployment import LabFleet, build_fleet  # noqa: E402
from srht_readonly.testing.etcd import EtcdCluster  # noqa: E402


def _rounds(fleet: LabFleet, rounds: int) -> dict[str, Any]:
    wall, switch, agents, own = [], [], [], 0
    for _ in range(rounds):
        for to in ("konpaku", "remilia"):
            started = time.monotonic()
            proc = fleet.cli("failover", "--to", to, "--yes", "--json")
            wall.append(time.monotonic() - started)
            if proc.returncode != 0:
                raise SystemExit(f"failover --to {to} failed:\n{proc.stdout}{proc.stderr}")
            result = json.loads(proc.stdout)
            switch.append(result["seconds"])
            agents += list((result.get("by_agents") or {}).values())
            own += len(result["reloaded"]) if result.get("generation") is not None else 0
    return {"failovers": len(wall), "wall_median_s": round(statistics.median(wall), 3),
            "wall_max_s": round(max(wall), 3), "switch_median_s": round(statistics.median(switch), 3),
            "switch_max_s": round(max(switch), 3),
            "agent_median_s": round(statistics.median(agents), 3) if agents else None,
            "agent_max_s": round(max(agents), 3) if agents else None, "repointed_by_the_command": own}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="srht-failover-agents-bench-") as tmp:
        fleet = build_fleet(lab)
        directory = Path(tmp)
        without = _rounds(fleet, args.rounds)
        with EtcdCluster(directory / "etcd") as etcd:
            with fleet.inventory.open("a") as f:
                f.write(f"\n[etcd]\nendpoints = {etcd.endpoints[0]}\n")
            with Agents(fleet, directory, "--dwell", "0") as agents:
                agents.wait_for("expect:", timeout=30)
                time.sleep(1.5)  # every agent's heartbeat in etcd
                with_agents = _rounds(fleet, args.rounds)
    summary = {"without_agents": without, "with_agents": with_agents,
               "switch_ratio": round(with_agents["switch_median_s"] / without["switch_median_s"], 2),
               "wall_ratio": round(with_agents["wall_median_s"] / without["wall_median_s"], 2)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, way in (("without agents", without), ("with agents", with_agents)):
            agents_part = (f"; each agent {way['agent_median_s']} s median, {way['agent_max_s']} s max, "
                           f"{way['repointed_by_the_command']} PgBouncer(s) repointed by the command itself"
                           if way["agent_median_s"] is not None else "")
            print(f"{name}: {way['failovers']} failovers, command {way['wall_median_s']} s median "
                  f"({way['wall_max_s']} s max), switch {way['switch_median_s']} s median "
                  f"({way['switch_max_s']} s max){agents_part}")
        print(f"ratio with/without agents: switch {summary['switch_ratio']}, command {summary['wall_ratio']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

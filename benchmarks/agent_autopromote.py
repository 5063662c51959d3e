"""Automatic promotion, kill after kill: how soon writes come back, and whether two primaries ever coexist.

One lab: a primary, a hot standby and three PgBouncers (one reached over a real sshd), a
one-member etcd, an ``srht-readonly agent --auto-promote AFTER`` beside each PgBouncer with a
fence command (``kill -9`` of the node's postmaster and children, then wait until it is gone),
a writer per PgBouncer committing an INSERT every 50 ms. Each round ``kill -9``'s the current
primary with no operator command; the agents fail over read-only, the leader fences and
promotes, every agent adopts the new primary; then the old primary is rejoined as the new
standby (``srht-readonly demote``, as an operator would) and the next round kills the new
primary. All along, a watcher asks both nodes ``pg_is_in_recovery()`` every 50 ms: a sample
where both answer as primaries is a split brain.

Printed: per round the seconds from the kill to writes back through every PgBouncer (the end of
the longest stretch without an acknowledged write, for the slowest writer), their median and
max (goal: within 10 s), promotions per round (must be 1) and split-brain samples (must be 0).

    .venv/bin/python benchmarks/agent_autopromote.py [--rounds 20] [--after 3] [--json]

Not a test: it asserts nothing about time; it exits 1 on a split brain, a round without exactly
one promotion, or writes that never came back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from srht_readonly.ops import sql  # noqa: E402
from srht_readonly.testing import Lab  # noqa: E402
from srht_readonly.testing.agents import Agents, write_fence, writes_restored  # noqa: E402
from srht_readonly.testing.deployment import build_fleet  # noqa: E402
from srht_readonly.testing.etcd import EtcdCluster  # noqa: E402
from srht_readonly.testing.load import WriteLoad  # noqa: E402


class Watcher:
    """Asks every node ``pg_is_in_recovery()`` every ``interval`` s; counts samples with two primaries."""

    def __init__(self, dsns: dict[str, str], interval: float = 0.05) -> None:
        self.dsns, self.interval = dsns, interval
        self.samples = 0
        self.split: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            primaries = []
            for name, dsn in self.dsns.items():
                try:
                    if sql.role(dsn) == "primary":
                        primaries.append(name)
                except Exception:  # noqa: BLE001, S110 - down or starting: not a primary
                    pass
            self.samples += 1
            if len(primaries) > 1:
                self.split.append((time.monotonic(), primaries))
            self._stop.wait(self.interval)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--after", type=float, default=3.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rounds: list[dict[str, Any]] = []
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="srht-autopromote-bench-") as tmp:
        fleet = build_fleet(lab)
        directory = Path(tmp)
        fence = write_fence(directory / "fence")
        with EtcdCluster(directory / "etcd") as etcd:
            with fleet.inventory.open("a") as f:
                f.write(f"\n[etcd]\nendpoints = {etcd.endpoints[0]}\n\n[agent]\nfence = {fence}\n")
            with Agents(fleet, directory, "--dwell", "0", "--auto-promote", str(args.after)) as agents, \
                    Watcher({n: node.admin_dsn for n, node in lab.nodes.items()}) as watcher:
                agents.wait_for("expect:", timeout=30)
                time.sleep(1.5)
                primary, standby = lab.nodes["remilia"], lab.nodes["konpaku"]
                for i in range(args.rounds):
                    promotions_before = sum(agents.count("promote:").values())
                    WriteLoad.create_table(primary.dsn)  # empty: each round's writers number from 0 again
                    with WriteLoad([b.dsn for b in lab.bouncers], clients=len(lab.bouncers), pause=0.05) as load:
                        time.sleep(1.0)
                        learned = f"on {standby.name} (primary"  # an agent's "expect:" line: adopted, or converged
                        before = agents.count(learned)
                        killed = time.monotonic()
                        primary.kill()
                        while any(c <= before[n] for n, c in agents.count(learned).items()):
                            if time.monotonic() - killed > 30:
                                print(f"not every agent expects {standby.name} 30 s after the kill", file=sys.stderr)
                                break
                            time.sleep(0.05)
                        time.sleep(1.0)
                    back = writes_restored(load, killed)
                    promotions = sum(agents.count("promote:").values()) - promotions_before
                    rounds.append({"round": i + 1, "killed": primary.name, "writes_back_s": None if back is None
                                   else round(back, 3), "promotions": promotions, "split_samples": len(watcher.split)})
                    if not args.json:
                        print(f"round {i + 1}: {primary.name} killed, writes back after "
                              f"{rounds[-1]['writes_back_s']} s, {promotions} promotion(s)", file=sys.stderr)
                    if promotions != 1 or back is None:
                        break
                    # The operator rejoins the old primary as the new one's standby; the agents expect it.
                    proc = fleet.cli("demote", primary.name, "--primary", standby.name, "--yes")
                    if proc.returncode != 0:
                        print(proc.stdout + proc.stderr, file=sys.stderr)
                        break
                    sql.wait_until(lambda node=primary: sql.query(
                        node.admin_dsn, "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'"),
                        timeout=60, what="the rejoined node streaming")
                    time.sleep(1.5)  # the agents' probes see it stream
                    primary, standby = standby, primary
            samples = watcher.samples
    times = [r["writes_back_s"] for r in rounds if r["writes_back_s"] is not None]
    summary = {"after_s": args.after, "rounds": rounds, "rounds_done": len(rounds),
               "split_brain_samples": rounds[-1]["split_samples"] if rounds else 0, "watcher_samples": samples,
               "writes_back_median_s": round(statistics.median(times), 3) if times else None,
               "writes_back_max_s": round(max(times), 3) if times else None}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{len(rounds)} kills, --auto-promote {args.after:g}: writes back through every PgBouncer median "
              f"{summary['writes_back_median_s']} s, max {summary['writes_back_max_s']} s; promotions per round "
              f"{sorted({r['promotions'] for r in rounds})}; split-brain samples {summary['split_brain_samples']} of "
              f"{samples}")
    ok = (len(rounds) == args.rounds and all(r["promotions"] == 1 for r in rounds) and len(times) == len(rounds)
          and summary["split_brain_samples"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

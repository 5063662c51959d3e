"""How often the full default drill passes: ``srht-readonly drill`` played N times back to back.

Each run is the drill a newcomer's ``make drill`` plays (every scenario, a fresh embedded lab and
the stand-in services), as a subprocess with ``--json``. The figure is passes/N, with every
failed expectation counted across runs and the time each run took; a drill that can fail on a
healthy lab is a drill nobody trusts.

    .venv/bin/python benchmarks/drill_stability.py --runs 10 [--load typical|excessive]
        [--duration 8] [--json]

Not a test: it prints what it measured; it exits 1 if any run failed (or could not run).
Needs root, like the drill. Each run writes its report into ``drill-stability/run-K/``.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CLI = str(Path(sys.executable).with_name("srht-readonly"))


def play(k: int, *, load: str, duration: float, directory: Path) -> dict[str, Any]:
    """Run the drill once; what it reported (or why it could not)."""
    report = directory / f"run-{k}"
    started = time.monotonic()
    proc = subprocess.run([CLI, "drill", "--load", load, "--duration", f"{duration:g}", "--json",
                           "--report", str(report)], capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        why = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return {"passed": False, "seconds": seconds, "failed": [why]}
    failed = [f"{s['name']}: {e['text']}" for s in result["scenarios"] for e in s["expectations"] if not e["passed"]]
    return {"passed": proc.returncode == 0 and result["passed"], "seconds": seconds, "failed": failed,
            "held_longer": {s["name"]: s["facts"].get("held_longer", {}) for s in result["scenarios"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--load", choices=("typical", "excessive"), default="typical")
    parser.add_argument("--duration", type=float, default=8.0, help="the drill's --duration (its default: 8)")
    parser.add_argument("--directory", type=Path, default=Path("drill-stability"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    for k in range(1, args.runs + 1):
        run = play(k, load=args.load, duration=args.duration, directory=args.directory)
        runs.append(run)
        verdict = "pass" if run["passed"] else "FAIL: " + "; ".join(run["failed"][:3])
        print(f"run {k}/{args.runs}: {verdict} ({run['seconds']:.0f} s)", file=sys.stderr, flush=True)
    failures = collections.Counter(text for run in runs for text in run["failed"])
    summary = {
        "load": args.load, "duration": args.duration, "runs": len(runs),
        "passed": sum(r["passed"] for r in runs),
        "seconds_median": round(statistics.median(r["seconds"] for r in runs), 1),
        "seconds_max": round(max(r["seconds"] for r in runs), 1),
        "failed_expectations": dict(failures.most_common()),
    }
    if args.json:
        print(json.dumps({**summary, "each": runs}, indent=2))
    else:
        print(f"drill stability, load {args.load}, --duration {args.duration:g}: "
              f"{summary['passed']}/{summary['runs']} passed; "
              f"{summary['seconds_median']:.0f} s median, {summary['seconds_max']:.0f} s max per drill")
        for text, n in failures.most_common():
            print(f"  failed {n}x: {text}")
    return 0 if summary["passed"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())

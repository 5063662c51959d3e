"""What the shared read-only state costs a healthy request, and how fast a change reaches every process.

One run, one lab (a primary behind PgBouncer) and a private ``redis-server``:

1. **Throughput** of the git.sr.ht stand-in (Flask test client, the same healthy mix as
   ``flask_overhead.py``: list page, repository page, settings POST), two apps from the same
   factory on the same database: ``on`` (``SRHT_READONLY_REDIS_URL``: its monitor shares its
   state, its subscriber and publisher threads connected for the whole run) and ``off`` (no
   shared state), plus ``no-retry`` (no shared state, ``SRHT_READONLY_RETRY_BUDGET = 0``: no
   retry ledger) to show what the transparent retry's per-statement ledger costs. Rounds
   rotate which variant goes first; the figure is the median of the paired per-round ratios
   (goal for on/off: >= 0.98), wall-clock and on this process's CPU time. The threads exist
   during the ``off`` rounds too (they are the process's), so their own cost is measured apart:
   the process's CPU time over ``--idle`` seconds of nothing with them connected.
2. **Propagation**: ``--processes`` real OS processes (spawned), each with its own monitor
   probing the lab's primary through its own engine and its own ``SharedState``; this process
   changes its monitor (``set_read_only``, then ``set_writable``, alternately, ``--changes``
   times) and each process reports when its monitor changed. The figure per change is the time
   until **every** process had learned it (the slowest one): p50 and p99, for read-only hints
   (applied at once) and writable hints (each process probes the database first) and both
   together (goal: p99 < 100 ms).

    .venv/bin/python benchmarks/shared_state.py [--rounds 120] [--requests 15] [--processes 4]
                                                [--changes 200] [--json]

Not a test: it asserts nothing about time; it exits 1 only if a process never learned a change.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.flask_overhead import workload  # noqa: E402  (the same healthy mix)
from integrations.gitsrht.web import create_app, init_db  # noqa: E402
from integrations.webhooks.harness import RedisServer  # noqa: E402
from srht_readonly import ReadOnlyMonitor  # noqa: E402
from srht_readonly.shared_state import SharedState  # noqa: E402
from srht_readonly.sqlalchemy import create_engine  # noqa: E402
from srht_readonly.testing import Lab  # noqa: E402

VARIANTS = ("off", "on", "no-retry")




def paired(values: dict[str, list[float]], variant: str, base: str) -> float:
    return statistics.median(v / b for v, b in zip(values[variant], values[base], strict=True))


def throughput(url: str, redis_url: str, rounds: int, requests: int, idle: float) -> dict[str, Any]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    apps = {
        "off": create_app(url),
        "on": create_app(url, config={"SRHT_READONLY_REDIS_URL": redis_url, "SRHT_READONLY_SHARED_PREFIX": prefix}),
        "no-retry": create_app(url, config={"SRHT_READONLY_RETRY_BUDGET": 0}),
    }
    shared: SharedState = apps["on"].extensions["srht_readonly"].shared
    if not shared.connected.wait(5):
        raise SystemExit(f"the shared state never connected to {redis_url}")
    started_cpu = time.process_time()
    time.sleep(idle)
    idle_cpu = time.process_time() - started_cpu
    clients = {name: app.test_client() for name, app in apps.items()}
    repos = [f"bench-{i}" for i in range(10)]
    for name in repos:
        clients["off"].post("/create", data={"name": name, "visibility": "public"})
    seq = [0]
    for client in clients.values():  # warm up pools, templates, caches
        workload(client, repos, 60, seq)
    rps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            started, started_cpu = time.perf_counter(), time.process_time()
            workload(clients[name], repos, requests, seq)
            rps[name].append(requests / (time.perf_counter() - started))
            cpu[name].append(requests / max(time.process_time() - started_cpu, 1e-9))
    connected = shared.connected.is_set()
    shared.stop()
    for app in apps.values():
        app.extensions["gitsrht.db"].get_bind().dispose()
    return {
        "rps_median": {name: statistics.median(v) for name, v in rps.items()},
        "ratio_on_off": paired(rps, "on", "off"),
        "cpu_ratio_on_off": paired(cpu, "on", "off"),
        "ratio_retry_ledger": paired(rps, "off", "no-retry"),
        "cpu_ratio_retry_ledger": paired(cpu, "off", "no-retry"),
        "threads_idle_cpu_ms_per_s": 1000 * idle_cpu / idle,
        "still_connected": connected,
    }


def listener_process(url: str, redis_url: str, prefix: str, events: Any, stop: Any) -> None:
    """One service process: its monitor (probing the real database), its shared state, its reports."""
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    monitor = ReadOnlyMonitor(engine, recheck=600, announce_file=None)
    from srht_readonly.sqlalchemy import instrument

    instrument(engine, monitor)

    def report(event: Any) -> None:
        if event["event"] in ("read-only", "writable"):
            events.put((os.getpid(), event["event"], time.time()))

    monitor.add_listener(report)
    shared = SharedState(monitor, redis_url, prefix=prefix).start()
    events.put((os.getpid(), "ready" if shared.connected.wait(10) else "not connected", time.time()))
    stop.wait()
    shared.stop()
    engine.dispose()


def propagation(url: str, redis_url: str, processes: int, changes: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    children = [ctx.Process(target=listener_process, args=(url, redis_url, prefix, events, stop), daemon=True)
                for _ in range(processes)]
    for child in children:
        child.start()
    origin = ReadOnlyMonitor(announce_file=None)
    shared = SharedState(origin, redis_url, prefix=prefix).start()
    latencies: dict[str, list[float]] = {"read-only": [], "writable": []}
    missed = 0
    try:
        ready = [events.get(timeout=60) for _ in children]
        if any(kind != "ready" for _, kind, _ in ready) or not shared.connected.wait(10):
            raise SystemExit(f"processes not connected: {ready}")
        for i in range(changes):
            kind = "read-only" if i % 2 == 0 else "writable"
            started = time.time()
            if kind == "read-only":
                origin.set_read_only("cannot execute UPDATE in a read-only transaction")
            else:
                origin.set_writable("the database takes writes")
            learned: dict[int, float] = {}
            deadline = time.monotonic() + 5
            while len(learned) < processes and time.monotonic() < deadline:
                try:
                    pid, event, at = events.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if event == kind:
                    learned[pid] = at
            if len(learned) < processes:
                missed += 1
                continue
            latencies[kind].append(max(learned.values()) - started)
            time.sleep(0.02)
    finally:
        stop.set()
        shared.stop()
        for child in children:
            child.join(10)
            if child.is_alive():
                child.terminate()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000 if ordered else float("nan")

    every = latencies["read-only"] + latencies["writable"]
    return {
        "processes": processes,
        "changes": changes,
        "missed": missed,
        "ms": {name: {"p50": pct(v, 0.5), "p99": pct(v, 0.99), "max": pct(v, 1.0)}
               for name, v in (*latencies.items(), ("all", every))},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=120, help="timed rounds per variant")
    parser.add_argument("--requests", type=int, default=15, help="requests per round")
    parser.add_argument("--processes", type=int, default=4, help="processes that must learn each change")
    parser.add_argument("--changes", type=int, default=200, help="changes made by the origin process")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU time measured")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with Lab(standby=False) as lab, tempfile.TemporaryDirectory(prefix="bench-redis-") as scratch:
        redis = RedisServer(Path(scratch))
        redis.start()
        try:
            engine = create_engine(lab.primary.url)
            init_db(engine, "alice")
            engine.dispose()
            url = lab.pgbouncer.url
            result = {"throughput": throughput(url, redis.url(), args.rounds, args.requests, args.idle),
                      "propagation": propagation(url, redis.url(), args.processes, args.changes)}
        finally:
            redis.stop()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        t, p = result["throughput"], result["propagation"]
        print(f"git.sr.ht stand-in through PgBouncer, {args.rounds} rotating rounds x {args.requests} requests")
        for name in VARIANTS:
            print(f"  {name:>9}: {t['rps_median'][name]:7.1f} req/s median")
        print(f"  shared state on/off: {t['ratio_on_off']:.3f} wall-clock, {t['cpu_ratio_on_off']:.3f} on CPU time "
              "(medians of paired rounds; goal >= 0.98)")
        print(f"  the shared state's two threads, idle and connected: {t['threads_idle_cpu_ms_per_s']:.3f} ms of "
              "CPU per second")
        print(f"  retry ledger (off / no-retry): {t['ratio_retry_ledger']:.3f} wall-clock, "
              f"{t['cpu_ratio_retry_ledger']:.3f} on CPU time")
        print(f"propagation to all {p['processes']} other processes, {p['changes']} changes "
              f"({p['missed']} never learned by all):")
        for name, ms in p["ms"].items():
            print(f"  {name:>9}: p50 {ms['p50']:.1f} ms, p99 {ms['p99']:.1f} ms, max {ms['max']:.1f} ms"
                  + ("  (goal: p99 < 100 ms)" if name == "all" else ""))
    return 1 if result["propagation"]["missed"] else 0


if __name__ == "__main__":
    sys.exit(main())

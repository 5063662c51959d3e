"""What srht_readonly.flask costs a healthy request: the git.sr.ht stand-in with vs without it.

One run, one lab (a primary behind PgBouncer, as in production), three apps built by the same
factory on the same database: ``without`` (no extension, engine not instrumented), ``with`` (the
real thing: ``ReadOnly(app, session=db)``, which also instruments the engine) and, to tell the
two costs apart, ``instrumented`` (``srht_readonly.sqlalchemy.instrument`` alone, no Flask hooks).
Rounds rotate which variant goes first, so that load from elsewhere on the machine hits all
alike. The figure is the median over rounds of the paired ratio (with / without requests per
second of the same round; goal: >= 0.98), next to the same ratio on this process's CPU time
(requests per CPU-second: the cost is all in-process, and CPU time is what other tenants of a
busy machine disturb least).

It also proves that a healthy request runs no probe: every statement of every connection is
counted at the DBAPI level (a psycopg2 cursor factory, which sees the monitor's raw probe too)
and through SQLAlchemy's ``before_cursor_execute`` event; the two apps must run the same number
of statements per request and none may be ``pg_is_in_recovery()``.

    .venv/bin/python benchmarks/flask_overhead.py [--rounds 120] [--requests 15] [--json]

Not a test: it asserts nothing about time; it exits 1 only if a probe ran on a healthy request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2.extensions
from sqlalchemy import create_engine, event

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations.gitsrht.web import create_app, init_db  # noqa: E402
from srht_readonly import ReadOnlyMonitor  # noqa: E402
from srht_readonly.sqlalchemy import instrument  # noqa: E402
from srht_readonly.testing import Lab  # noqa: E402

PROBE = "pg_is_in_recovery"


class CountingCursor(psycopg2.extensions.cursor):
    """Counts every statement of the connections it is installed on, raw ones included."""

    counts: dict[str, int] = {}
    probes = 0
    current = ""

    def execute(self, query: Any, vars: Any = None) -> Any:
        text = query if isinstance(query, str) else query.decode()
        CountingCursor.counts[CountingCursor.current] = CountingCursor.counts.get(CountingCursor.current, 0) + 1
        if PROBE in text:
            CountingCursor.probes += 1
        return super().execute(query, vars)


VARIANTS = ("without", "instrumented", "with")


def build(url: str, variant: str, *, counting: bool = False) -> tuple[Any, dict[str, int]]:
    """The stand-in app; ``counting`` adds the statement counters (kept out of the timed apps)."""
    options = {"connect_args": {"cursor_factory": CountingCursor}} if counting else {}
    app = create_app(url, read_only=variant == "with", engine_options=options)
    engine = app.extensions["gitsrht.db"].get_bind()
    if variant == "instrumented":
        instrument(engine, ReadOnlyMonitor(engine))
    events = {"statements": 0}
    if counting:
        @event.listens_for(engine, "before_cursor_execute")
        def count(*args: Any) -> None:
            events["statements"] += 1

    return app, events


def workload(client: Any, repos: list[str], n: int, seq: list[int]) -> None:
    """A healthy mix: the list page, a repository page, a settings change (a real write)."""
    for i in range(n):
        name = repos[i % len(repos)]
        kind = i % 3
        if kind == 0:
            response = client.get("/")
        elif kind == 1:
            response = client.get(f"/~alice/{name}/")
        else:
            seq[0] += 1
            response = client.post(f"/~alice/{name}/settings",
                                   data={"description": f"d{seq[0]}", "visibility": "public"})
        if response.status_code not in (200, 302):
            raise SystemExit(f"unexpected {response.status_code} on a healthy request: {response.text[:200]}")


def paired(values: dict[str, list[float]], variant: str) -> float:
    return statistics.median(v / base for v, base in zip(values[variant], values["without"], strict=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=120, help="timed rounds per variant")
    parser.add_argument("--requests", type=int, default=15, help="requests per round")
    parser.add_argument("--count", type=int, default=300, help="requests whose statements are counted")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    with Lab(standby=False) as lab:
        engine = create_engine(lab.primary.url)
        init_db(engine, "alice")
        engine.dispose()
        url = lab.pgbouncer.url
        timed = {name: build(url, name)[0] for name in VARIANTS}
        counted = {name: build(url, name, counting=True) for name in ("without", "with")}
        clients = {name: app.test_client() for name, app in timed.items()}
        repos = [f"bench-{i}" for i in range(10)]
        for name in repos:
            clients["with"].post("/create", data={"name": name, "visibility": "public"})
        seq = [0]

        # 1. Statements: the same per request with and without, and never a probe.
        for name, (app, _) in counted.items():
            CountingCursor.current = name
            workload(app.test_client(), repos, args.count, seq)
        for client in clients.values():  # warm up pools, templates, caches
            workload(client, repos, 60, seq)

        # 2. Throughput, rotating which variant goes first.
        rps: dict[str, list[float]] = {name: [] for name in VARIANTS}
        cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            for name in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
                started, started_cpu = time.perf_counter(), time.process_time()
                workload(clients[name], repos, args.requests, seq)
                rps[name].append(args.requests / (time.perf_counter() - started))
                cpu[name].append(args.requests / max(time.process_time() - started_cpu, 1e-9))
        for app in [*timed.values(), *(app for app, _ in counted.values())]:
            app.extensions["gitsrht.db"].get_bind().dispose()

    per_request = {name: CountingCursor.counts.get(name, 0) / args.count for name in counted}
    events = {name: counted[name][1]["statements"] / args.count for name in counted}
    median = {name: statistics.median(values) for name, values in rps.items()}
    cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
    result = {
        "requests_per_round": args.requests,
        "rounds": args.rounds,
        "rps_median": median,
        "ratio": paired(rps, "with"),
        "ratio_instrumented": paired(rps, "instrumented"),
        "cpu_rps_median": cpu_median,
        "cpu_ratio": paired(cpu, "with"),
        "cpu_ratio_instrumented": paired(cpu, "instrumented"),
        "cpu_us_per_request": {name: 1e6 / value for name, value in cpu_median.items()},
        "dbapi_statements_per_request": per_request,
        "sqlalchemy_event_statements_per_request": events,
        "probe_statements_on_healthy_requests": CountingCursor.probes,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"git.sr.ht stand-in through PgBouncer, {args.rounds} rotating rounds x {args.requests} requests "
              "(list page, repository page, settings POST)")
        for name in VARIANTS:
            values = rps[name]
            print(f"  {name:>12}: {median[name]:7.1f} req/s median (min {min(values):.1f}, max {max(values):.1f}); "
                  f"{result['cpu_us_per_request'][name]:6.0f} us CPU/request")
        print(f"  ratio with/without: {result['ratio']:.3f} wall-clock, {result['cpu_ratio']:.3f} on CPU time "
              "(medians of paired rounds; goal >= 0.98)")
        print(f"  of which instrument() alone: {result['ratio_instrumented']:.3f} wall-clock, "
              f"{result['cpu_ratio_instrumented']:.3f} on CPU time")
        for name in counted:
            print(f"  statements/request {name}: {per_request[name]:.2f} at the DBAPI, "
                  f"{events[name]:.2f} seen by before_cursor_execute")
        print(f"  probe statements ({PROBE}) in {args.count} healthy requests: {CountingCursor.probes}")
    return 1 if CountingCursor.probes else 0


if __name__ == "__main__":
    sys.exit(main())

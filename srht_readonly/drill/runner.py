"""Run scenarios one by one under traffic, judge them, and build the report.

The runner knows nothing of where the servers are: it gets ``Procedures`` (lab or inventory),
the DSNs traffic goes through (the PgBouncers), and traffic sources for the services.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import latency as latency_mod
from . import ledger as ledger_mod
from . import verdicts
from .coverage import Coverage
from .recorder import Recorder
from .report import timeline
from .scenarios import BY_NAME, Expectation, Fact, Procedures, Scenario, Step

logger = logging.getLogger(__name__)

#: Seconds the operations under way when the traffic stops get to end before those left are judged hung.
SETTLE = 8.0

LOADS: dict[str, dict[str, Any]] = {
    "typical": {"writers": 4, "readers": 4, "pause": 0.02},
    "excessive": {"writers": 8, "readers": 8, "pause": 0.01},
}


class TrafficSource(Protocol):
    """A service's traffic: started and stopped around each scenario, judged after it.

    ``kinds`` names the kinds of operation it does (``Event.op``): a scenario holds a state
    until each kind has met it, and the verdicts require each kind to have done what the
    scenario demands. A source whose writes wait while the database is read-only (a build
    runner) may say so with a ``writes_wait = True`` attribute: its operations under way then
    count as having met the read-only state.
    """

    name: str

    @property
    def kinds(self) -> Sequence[str]: ...

    def start(self, recorder: Recorder) -> None: ...
    def stop(self) -> None: ...
    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]: ...


@dataclass
class Fleet:
    """Where the drill acts and sends traffic.

    ``traffic_dsns`` go through the PgBouncers (one per PgBouncer); the ledger table is created
    through the first. ``ledger_dsn(node)`` reads that database directly on ``node``, as a user
    that may read the ledger, to count what survived.
    """

    procedures: Procedures
    traffic_dsns: Sequence[str]
    ledger_dsn: Callable[[str], str]


Progress = Callable[[str, Recorder | None], None]


def run_scenario(fleet: Fleet, scenario: Scenario, *, duration: float, load: str = "typical",
                 sources: Sequence[TrafficSource] = (), progress: Progress | None = None) -> dict[str, Any]:
    """Play one scenario under traffic; return its result (expectations, figures, timeline)."""
    p = fleet.procedures
    recorder = Recorder()
    coverage = Coverage(recorder, {ledger_mod.SERVICE: ledger_mod.KINDS, **{s.name: tuple(s.kinds) for s in sources}},
                        waiting=[s.name for s in sources if getattr(s, "writes_wait", False)])
    step = Step(p, recorder, duration, progress=coverage)
    started = time.monotonic()
    try:  # every scenario starts from a healthy fleet, or is not played at all
        p.ready()
        ledger_mod.prepare(fleet.traffic_dsns[0])
    except Exception as exc:
        logger.exception("scenario %s not played", scenario.name)
        check = Expectation("the fleet was ready: a primary, a streaming standby, every PgBouncer on the primary",
                            False, f"{type(exc).__name__}: {exc}")
        return _result(scenario, recorder, step, [check], ledger_mod.LedgerResult(0), started)
    settings = LOADS[load]
    ledgers = [ledger_mod.Ledger(dsn, recorder, writers=max(1, settings["writers"] // len(fleet.traffic_dsns)),
                                 readers=max(1, settings["readers"] // len(fleet.traffic_dsns)),
                                 pause=settings["pause"], first_writer=100 * i)
               for i, dsn in enumerate(fleet.traffic_dsns)]
    recorder.traffic_from = recorder.now()
    for lg in ledgers:
        lg.start()
    for src in sources:
        src.start(recorder)
    if progress:
        progress(f"{scenario.name}: traffic started", recorder)
    checks = []
    try:
        scenario.run(step)
    except Exception as exc:  # the report must say what broke; the next scenario checks where things are
        logger.exception("scenario %s failed", scenario.name)
        checks.append(Expectation("the procedure ran to the end", False, f"{type(exc).__name__}: {exc}"))
        recorder.mark(f"aborted: {type(exc).__name__}")
    finally:
        recorder.traffic_until = recorder.now()
        for src in sources:
            src.stop()
        for lg in ledgers:
            lg.stop()
        # Operations under way get SETTLE seconds to end (a git push takes seconds on 2 busy cores);
        # what is still in flight then, and was started before the grace period, is hung.
        recorder.wait_idle(max(0.0, SETTLE - (recorder.now() - recorder.traffic_until)))
        hung = recorder.close(grace=verdicts.GRACE)
        if hung:
            logger.warning("scenario %s: %d operation(s) hung: %s", scenario.name, len(hung),
                           ", ".join(f"{e.service} {e.op} ({e.latency:.1f} s)" for e in hung[:10]))
    try:
        result_ledger = _verify(ledgers, fleet, p)
    except Exception as exc:
        logger.exception("scenario %s: ledger not verified", scenario.name)
        checks.append(Expectation("acknowledged writes were counted on the primary", False,
                                  f"{type(exc).__name__}: {exc}"))
        result_ledger = ledger_mod.LedgerResult(sum(len(lg.acked) for lg in ledgers))
    else:
        checks += _judged("database", lambda: verdicts.database(scenario.name, recorder, step.facts, result_ledger))
        for src in sources:
            checks += _judged(src.name, functools.partial(src.expectations, scenario.name, recorder, step.facts))
    return _result(scenario, recorder, step, checks, result_ledger, started)


def _judged(who: str, judge: Callable[[], list[Expectation]]) -> list[Expectation]:
    """``judge()``, or one failed expectation saying why it could not judge (the report must be written)."""
    try:
        return judge()
    except Exception as exc:
        logger.exception("judging %s failed", who)
        return [Expectation(f"{who}: its expectations could be judged", False, f"{type(exc).__name__}: {exc}")]


def _result(scenario: Scenario, recorder: Recorder, step: Step, checks: list[Expectation],
            result_ledger: ledger_mod.LedgerResult, started: float) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = {}
    for svc, counts in recorder.counts().items():
        services[svc] = {**counts, "longest_write_gap": round(recorder.longest_write_gap(svc), 3)}
    lost_because = ""
    if result_ledger.lost and Fact.STANDBY_RECEIVED in step.facts:
        lost_because = ("Replication is asynchronous: these commits were acknowledged by the old primary "
                        f"after the last WAL the standby had received ({step.facts[Fact.STANDBY_RECEIVED]}), "
                        "so they died with it; pg_rewind removed them from its data directory when it rejoined.")
    elif result_ledger.lost:
        lost_because = "No primary crashed in this scenario: losing an acknowledged write here is a bug."
    slowed = {}
    if Fact.SLOW_FROM in step.facts and Fact.SLOW_UNTIL in step.facts:  # soft-outage: latency per phase
        slowed = {"latency": latency_mod.figures(recorder.events, step.facts),
                  "latency_points": latency_mod.points(recorder.events)}
    return {
        "name": scenario.name,
        "title": scenario.title,
        "description": scenario.description,
        "passed": all(c.passed for c in checks),
        "seconds": round(time.monotonic() - started, 2),
        "expectations": [c.as_dict() for c in checks],
        "services": services,
        "write_unavailability": round(recorder.longest_write_gap("database"), 3),
        "ledger": result_ledger.as_dict(),
        "lost_because": lost_because,
        "facts": _plain(step.facts),
        "steps": [{"t": round(m.t, 3), "label": m.label} for m in recorder.marks],
        "timeline": timeline(recorder.events),
        **slowed,
    }


def _verify(ledgers: Sequence[ledger_mod.Ledger], fleet: Fleet, p: Procedures) -> ledger_mod.LedgerResult:
    total = ledger_mod.LedgerResult(0)
    dsn = fleet.ledger_dsn(p.primary())
    for lg in ledgers:
        r = lg.verify(dsn)
        total.acknowledged += r.acknowledged
        total.lost += r.lost
        total.commit_unknown += r.commit_unknown
        total.unknown_applied += r.unknown_applied
    return total


def run(fleet: Fleet, names: Sequence[str], *, duration: float, load: str = "typical",
        sources: Sequence[TrafficSource] = (), progress: Progress | None = None,
        environment: str = "") -> dict[str, Any]:
    """Play the named scenarios one by one; the whole report as a dict."""
    started = time.monotonic()
    results = []
    for name in names:
        scenario = BY_NAME[name]
        if progress:
            progress(f"scenario {scenario.name}: {scenario.title}", None)
        results.append(run_scenario(fleet, scenario, duration=duration, load=load, sources=sources,
                                    progress=progress))
    return {
        "passed": all(r["passed"] for r in results),
        "load": load,
        "duration": duration,
        "environment": environment,
        "seconds": round(time.monotonic() - started, 1),
        "scenarios": results,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)

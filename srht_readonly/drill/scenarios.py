"""The plan's mock contingency scenarios, each a script of procedure steps under traffic.

A scenario receives a ``Procedures`` (the operations it may perform, on the lab or on real
hosts), a ``Recorder`` already collecting traffic, and the steady-state ``duration`` to hold
between steps. It marks each step on the timeline and returns the facts its expectations need.
Every scenario starts from, and leaves behind, a primary with a streaming standby.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..ops.sql import parse_lsn
from .ledger import LedgerResult
from .recorder import Outcome, Recorder


class Procedures(Protocol):
    """What a scenario may do to the fleet; names are node names of the inventory."""

    def primary(self) -> str: ...
    def standby(self) -> str: ...
    def switchover(self, to: str) -> dict[str, Any]: ...
    def failover(self, to: str) -> None: ...
    def promote(self, node: str) -> None: ...
    def demote(self, node: str, primary: str) -> None: ...
    def stop(self, node: str, mode: str = "fast") -> None: ...
    def start(self, node: str) -> None: ...
    def kill(self, node: str) -> None: ...
    def receive_lsn(self, node: str) -> str | None: ...
    def wait_caught_up(self, node: str, timeout: float = 60) -> float: ...


@dataclass
class Step:
    """Holds the procedure and the clock while a scenario runs."""

    procedures: Procedures
    recorder: Recorder
    duration: float
    facts: dict[str, Any] = field(default_factory=dict)

    def hold(self, factor: float = 1.0) -> None:
        """Let traffic run in the current state."""
        time.sleep(self.duration * factor)

    def do(self, label: str, action: Callable[[], Any]) -> Any:
        """Mark ``label`` on the timeline, run ``action``, record how long it took."""
        self.recorder.mark(label)
        started = time.monotonic()
        result = action()
        self.facts.setdefault("step_seconds", {})[label] = round(time.monotonic() - started, 3)
        return result


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    description: str
    planned: bool
    run: Callable[[Step], None]


def planned_switchover(s: Step) -> None:
    p = s.procedures
    old, new = p.primary(), p.standby()
    s.hold()
    result = s.do(f"switchover {old} -> {new}", lambda: p.switchover(new))
    s.facts["switchover"] = result
    s.hold()


def readonly_failover_then_promotion(s: Step) -> None:
    """The plan's path: read-only failover, then stop the old primary, promote, demote."""
    p = s.procedures
    old, new = p.primary(), p.standby()
    s.hold()
    s.do(f"failover: PgBouncers -> {new} (read-only)", lambda: p.failover(new))
    s.facts["read_only_from"] = s.recorder.now()
    s.hold()
    s.do(f"stop {old}", lambda: p.stop(old, "fast"))
    s.do(f"promote {new}", lambda: p.promote(new))
    s.facts["read_only_until"] = s.recorder.now()
    s.hold()
    s.do(f"demote {old} to follow {new}", lambda: p.demote(old, new))
    s.hold(0.5)


def primary_crash(s: Step) -> None:
    """kill -9 the primary; read-only failover; promote; rejoin the old primary with pg_rewind."""
    p = s.procedures
    old, new = p.primary(), p.standby()
    s.hold()
    s.do(f"kill -9 {old}", lambda: p.kill(old))
    s.facts["crash_at"] = s.recorder.now()
    time.sleep(0.5)  # the time it takes a watchdog or an operator to notice
    s.facts["standby_received"] = p.receive_lsn(new)
    s.do(f"failover: PgBouncers -> {new}", lambda: p.failover(new))
    s.facts["failover_at"] = s.recorder.now()
    s.hold(0.5)
    s.do(f"promote {new}", lambda: p.promote(new))
    s.facts["promoted_at"] = s.recorder.now()
    s.hold()
    s.do(f"rejoin {old} (pg_rewind)", lambda: p.demote(old, new))
    s.hold(0.5)


def standby_crash(s: Step) -> None:
    """kill -9 the standby; services keep using the primary; bring it back up to date."""
    p = s.procedures
    standby = p.standby()
    s.hold()
    s.do(f"kill -9 {standby}", lambda: p.kill(standby))
    s.hold()
    s.do(f"start {standby}", lambda: p.start(standby))
    s.facts["catch_up_seconds"] = s.do(f"{standby} caught up", lambda: p.wait_caught_up(standby))
    s.hold(0.5)


def minor_upgrade(s: Step) -> None:
    """The plan's minor upgrade: switch over, restart (upgrade) the old primary, switch back."""
    p = s.procedures
    old, new = p.primary(), p.standby()
    s.hold(0.5)
    s.facts["there"] = s.do(f"switchover {old} -> {new}", lambda: p.switchover(new))
    s.hold(0.5)
    def restart() -> None:  # where an upgrade installs the new minor version's binaries
        p.stop(old, "fast")
        p.start(old)

    s.do(f"upgrade {old}: restart", restart)
    s.do(f"{old} caught up", lambda: p.wait_caught_up(old))
    s.hold(0.5)
    s.facts["back"] = s.do(f"switchover {new} -> {old}", lambda: p.switchover(old))
    s.hold(0.5)


SCENARIOS = [
    Scenario("switchover", "Planned switchover",
             "PAUSE every PgBouncer, fast-stop the primary, check the standby replayed its shutdown "
             "checkpoint, promote, repoint, RESUME, demote the old primary to follow.", True, planned_switchover),
    Scenario("readonly-failover", "Read-only failover, then promotion (the plan's path)",
             "Repoint every PgBouncer at the hot standby (services go read-only), then shut off the "
             "old primary, promote the standby and demote the old primary.", True, readonly_failover_then_promotion),
    Scenario("primary-crash", "Primary killed without warning",
             "kill -9 the primary, read-only failover, promotion, old primary rejoined with pg_rewind.",
             False, primary_crash),
    Scenario("standby-crash", "Standby killed, brought back up to date",
             "kill -9 the standby; it restarts and catches up while the primary serves.", False, standby_crash),
    Scenario("minor-upgrade", "Minor upgrade",
             "Switch over, restart the old primary as an upgrade would, switch back.", True, minor_upgrade),
]

BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Expectation:
    text: str
    passed: bool
    observed: Any

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "passed": bool(self.passed), "observed": self.observed}


def expectations(scenario: Scenario, recorder: Recorder, facts: dict[str, Any],
                 ledger: LedgerResult) -> list[Expectation]:
    """What must hold after ``scenario``, judged on what was recorded."""
    events = recorder.events
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    result = []
    if scenario.planned:
        result.append(Expectation("no acknowledged write lost", not ledger.lost, len(ledger.lost)))
        result.append(Expectation("no user saw an unexplained error", not errors,
                                  _sample(errors) if errors else 0))
    if scenario.name in ("switchover", "minor-upgrade"):
        gap = recorder.longest_write_gap("database")
        result.append(Expectation("longest write gap under 1 s", gap < 1.0, f"{gap:.2f} s"))
        failed = [e for e in events if e.write and e.outcome is not Outcome.OK]
        result.append(Expectation("no write failed", not failed, len(failed)))
    if scenario.name == "readonly-failover":
        lo, hi = facts["read_only_from"], facts["read_only_until"]
        reads_failed = [e for e in events if e.service == "database" and not e.write and e.outcome is Outcome.ERROR]
        result.append(Expectation("reads never failed", not reads_failed, len(reads_failed)))
        refused = [e for e in events if lo <= e.t <= hi and e.outcome is Outcome.EXPLAINED]
        result.append(Expectation("writes during the read-only window were refused with an explanation",
                                  bool(refused), len(refused)))
    if scenario.name == "primary-crash":
        back = _first_ok_after(events, facts["failover_at"], write=False)
        result.append(Expectation("reads restored within 2 s of the failover",
                                  back is not None and back - facts["failover_at"] <= 2.0,
                                  _secs(back, facts["failover_at"])))
        wback = _first_ok_after(events, facts["promoted_at"], write=True)
        result.append(Expectation("writes restored within 2 s of the promotion",
                                  wback is not None and wback - facts["promoted_at"] <= 2.0,
                                  _secs(wback, facts["promoted_at"])))
        unexplained = _lost_not_explained(ledger, facts.get("standby_received"))
        result.append(Expectation("every lost write was committed past the WAL the standby had received",
                                  not unexplained, f"{len(ledger.lost)} lost, {len(unexplained)} unexplained"))
    if scenario.name == "standby-crash":
        result.append(Expectation("no acknowledged write lost", not ledger.lost, len(ledger.lost)))
        result.append(Expectation("no user saw an error", not errors, _sample(errors) if errors else 0))
        catch_up = facts.get("catch_up_seconds")
        result.append(Expectation("standby caught up within 30 s of its restart",
                                  catch_up is not None and catch_up < 30, f"{catch_up:.2f} s" if catch_up else None))
    return result


def _first_ok_after(events: list[Any], t: float, *, write: bool) -> float | None:
    return min((e.t for e in events if e.t >= t and e.write == write and e.outcome is Outcome.OK
                and e.service == "database"), default=None)


def _secs(t: float | None, since: float) -> str:
    return "never" if t is None else f"{t - since:.2f} s"


def _sample(errors: list[Any]) -> str:
    by: dict[str, int] = {}
    for e in errors:
        key = f"{e.service}/{e.op}: {e.detail}"
        by[key] = by.get(key, 0) + 1
    top = sorted(by.items(), key=lambda kv: -kv[1])[:3]
    return f"{len(errors)} errors, e.g. " + "; ".join(f"{k} (x{n})" for k, n in top)


def _lost_not_explained(ledger: LedgerResult, received: str | None) -> list[dict[str, Any]]:
    """Lost writes whose INSERT came before what the standby had received (minus one WAL page,
    since the commit record follows the row's insert position closely)."""
    if received is None:
        return list(ledger.lost)
    limit = parse_lsn(received) - 8192
    return [w for w in ledger.lost if parse_lsn(w["lsn"]) < limit]

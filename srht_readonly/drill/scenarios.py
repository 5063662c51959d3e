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

from .recorder import Recorder


class Procedures(Protocol):
    """What a scenario may do to the fleet; names are node names of the inventory."""

    def ready(self) -> None: ...
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
    s.facts["promote_started"] = s.recorder.now()
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

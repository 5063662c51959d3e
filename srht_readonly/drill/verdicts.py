"""What must hold for any one service in each scenario, judged from its recorded outcomes.

Used for the probes of a real deployment; services with more to say (the local stand-ins) add
their own expectations on top. The rules follow the plan: a planned procedure or a standby
crash shows no user an unexplained error; during the read-only window writes are refused with the
explanation (or dropped where the plan allows it), never failed; after an unplanned crash, errors
are confined to the moments between the crash and a couple of seconds after the promotion.
"""

from __future__ import annotations

from typing import Any

from .recorder import Outcome, Recorder
from .scenarios import Expectation

SETTLE = 2.0  # seconds after the promotion by which everything must work again


def service_expectations(service: str, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
    """The expectations for ``service``'s events in ``scenario``."""
    events = [e for e in recorder.events if e.service == service]
    errors = [e for e in events if e.outcome is Outcome.ERROR]
    result = [Expectation(f"{service}: traffic ran", bool(events), f"{len(events)} operations")]
    if scenario == "primary-crash":
        crash, promoted = facts.get("crash_at"), facts.get("promoted_at")
        if crash is None or promoted is None:
            return [*result, Expectation(f"{service}: errors only between the crash and the promotion", False,
                                         "the scenario stopped before the promotion")]
        outside = [e for e in errors if not crash <= e.t <= promoted + SETTLE]
        result.append(Expectation(f"{service}: errors only between the crash and {SETTLE:g} s after the promotion",
                                  not outside, _errors(outside)))
        late = [e for e in events if e.t > promoted + SETTLE]
        result.append(Expectation(f"{service}: works after the promotion", bool(late) and not any(
            e.outcome is Outcome.ERROR for e in late), f"{len(late)} operations after"))
        return result
    result.append(Expectation(f"{service}: no user saw an unexplained error", not errors, _errors(errors)))
    return result


def _errors(errors: list[Any]) -> str:
    if not errors:
        return "0"
    first = errors[0]
    return f"{len(errors)}, first at {first.t:.2f} s: {first.op}: {first.detail}"

"""integrations.drill.ssh's read-only window verdicts, on recorded events (pure logic).

The same checks on real traffic (sshd, the pipeline, PgBouncer on the hot standby) run in
test_drill_services.py.
"""

from __future__ import annotations

from typing import Any

from integrations.drill.ssh import PUSH_DROPPED_READ_ONLY, PUSH_DROPPED_UNREACHABLE, loop_period, window_checks
from srht_readonly.drill import Event, Outcome

WINDOW = (10.0, 30.0)


def event(op: str, outcome: Outcome, start: float, took: float = 1.5, detail: str = "") -> Event:
    return Event(start + took, "ssh", op, outcome, took, op.startswith("push"), detail)


def in_window(push: Outcome = Outcome.DROPPED, detail: str = PUSH_DROPPED_READ_ONLY) -> list[Event]:
    """One of each kind inside ``WINDOW``, each as the plan wants it but the push as given."""
    return [
        event("push", push, 12.0, detail=detail),
        event("push-new", Outcome.EXPLAINED, 13.0, detail="refused: read-only, repository not created"),
        event("fetch", Outcome.OK, 14.0),
        event("new-key", Outcome.DROPPED, 16.0, detail="key worked and was not stored"),
    ]


def verdict(events: list[Event], loop_of: dict[Any, int] | None = None) -> dict[str, tuple[bool, str]]:
    return {c.text: (c.passed, c.observed) for c in window_checks(events, *WINDOW, loop_of or {})}


PUSH_CHECK = "ssh: in the read-only window, pushes were saved, their webhooks dropped with the read-only warning"


def test_in_the_window_pushes_dropped_with_the_read_only_warning_pass():
    assert all(passed for passed, _ in verdict(in_window()).values())


def test_in_the_window_a_push_dropped_with_the_unreachable_warning_fails_the_push_check():
    checks = verdict(in_window(detail=PUSH_DROPPED_UNREACHABLE))
    passed, observed = checks[PUSH_CHECK]
    assert not passed
    assert "1 dropped without the read-only warning" in observed and "database unreachable" in observed
    assert all(passed for text, (passed, _) in checks.items() if text != PUSH_CHECK)


def test_outside_the_window_the_unreachable_warning_is_not_judged_by_the_window_check():
    events = [*in_window(), event("push", Outcome.DROPPED, 40.0, detail=PUSH_DROPPED_UNREACHABLE)]
    assert verdict(events)[PUSH_CHECK][0]


def test_the_period_is_each_loops_own_not_the_gap_between_loops():
    # Two loops of the same kind, each starting one every 8 s, the second 4 s after the first:
    # all starts together are 4 s apart, but a 9 s window need not hold a whole one of either.
    first = [event("push", Outcome.OK, t) for t in (0.0, 8.0, 16.0, 24.0)]
    second = [event("push", Outcome.OK, t) for t in (4.0, 12.0, 20.0, 28.0)]
    loop_of = {e: 0 for e in first} | {e: 1 for e in second}
    assert loop_period(first + second, loop_of) == 8.0
    assert loop_period(first + second, {}) == 4.0  # what the old heuristic saw


def test_a_window_shorter_than_one_loops_period_and_an_operation_requires_none():
    pushes = [event("push", Outcome.OK, t) for t in (0.0, 8.0, 16.0, 24.0)]
    others = [event("push", Outcome.OK, t) for t in (4.0, 12.0, 20.0, 28.0)]
    loop_of = {e: 0 for e in pushes} | {e: 1 for e in others}
    lo, hi = 30.5, 37.0  # 6.5 s: >= 4 + 1.5 (all loops together), < 8 + 1.5 (one loop)
    [push] = [c for c in window_checks(pushes + others, lo, hi, loop_of) if c.text == PUSH_CHECK]
    assert push.passed, push.observed
    assert "one every 8.0 s per loop" in push.observed and "none required" in push.observed
    [push] = [c for c in window_checks(pushes + others, lo, 40.0, loop_of) if c.text == PUSH_CHECK]
    assert not push.passed, "a 9.5 s window holds a whole push of a loop: one is required"

"""integrations.drill.ssh's read-only state verdicts, on recorded events (pure logic).

The same checks on real traffic (sshd, the pipeline, PgBouncer on the hot standby) run in
test_drill_services.py.
"""

from __future__ import annotations

from integrations.drill.ssh import PUSH_DROPPED_READ_ONLY, PUSH_DROPPED_UNREACHABLE, observed, window_checks
from srht_readonly.drill import Event, Outcome, State

#: Read-only from 10 s to 30 s.
FACTS = {"read_only_from": 10.0, "window_closing": 30.0, "read_only_until": 30.5,
         "states": [["read-only", 10.0, 30.0]]}


def event(op: str, outcome: Outcome, start: float, took: float = 1.5, detail: str = "",
          met: State | None = None) -> Event:
    return Event(start + took, "ssh", op, outcome, took, op.startswith("push"), detail,
                 met or observed(op, outcome, detail))


def in_window(push: Outcome = Outcome.DROPPED, detail: str = PUSH_DROPPED_READ_ONLY) -> list[Event]:
    """One of each kind inside the read-only state, each as the plan wants it but the push as given."""
    return [
        event("push", push, 12.0, detail=detail),
        event("push-new", Outcome.EXPLAINED, 13.0, detail="refused: read-only, repository not created"),
        event("fetch", Outcome.OK, 14.0),
        event("new-key", Outcome.DROPPED, 16.0, detail="key worked and was not stored", met=State.READ_ONLY),
    ]


def verdict(events: list[Event]) -> dict[str, tuple[bool, str]]:
    return {c.text: (c.passed, c.observed) for c in window_checks(events, FACTS)}


PUSH_CHECK = "ssh: in the read-only state, pushes were saved, their webhooks dropped with the read-only warning"
NEW_CHECK = "ssh: in the read-only state, pushes creating a repository were refused with the reason"


def test_in_the_window_each_kind_as_the_plan_says_passes():
    checks = verdict(in_window())
    assert all(passed for passed, _ in checks.values()), checks


def test_in_the_window_a_push_dropped_with_the_unreachable_warning_fails_the_push_check():
    checks = verdict(in_window(detail=PUSH_DROPPED_UNREACHABLE))
    passed, said = checks[PUSH_CHECK]
    assert not passed
    assert "1 dropped without the read-only warning" in said and "database unreachable" in said


def test_outside_the_window_the_unreachable_warning_is_not_judged_by_the_window_check():
    events = [*in_window(), event("push", Outcome.DROPPED, 40.0, detail=PUSH_DROPPED_UNREACHABLE)]
    assert verdict(events)[PUSH_CHECK][0]


def test_a_kind_that_never_met_the_read_only_state_fails_its_check():
    events = [e for e in in_window() if e.op != "push"] + [event("push", Outcome.OK, 3.0, detail="")]
    passed, said = verdict(events)[PUSH_CHECK]
    assert not passed and "0 met the read-only state" in said


def test_a_push_that_straddles_the_start_is_judged_by_what_it_observed():
    # Began writable, recorded everything then: not judged as read-only, and nothing wrong with it.
    began_writable = event("push", Outcome.OK, 9.0, took=3.0)
    # Began writable, its hook met the read-only database: dropped with the warning, as the plan says.
    hook_read_only = event("push", Outcome.DROPPED, 9.5, took=3.0, detail=PUSH_DROPPED_READ_ONLY)
    events = [began_writable, hook_read_only, *in_window()[1:]]
    checks = verdict(events)
    assert checks[PUSH_CHECK] == (True, "1 operations; 1 met the read-only state")


def test_a_repository_created_while_read_only_is_caught():
    created = event("push-new", Outcome.DROPPED, 20.0, detail=f"created; {PUSH_DROPPED_READ_ONLY}")
    passed, said = verdict([*in_window(), created])[NEW_CHECK]
    assert not passed and "created while read-only" in said
    before = event("push-new", Outcome.DROPPED, 9.0, took=3.0, detail=f"created; {PUSH_DROPPED_READ_ONLY}")
    assert verdict([*in_window(), before])[NEW_CHECK][0]  # created before the state began: fine

"""The drill's verdicts on synthetic event streams (pure logic, no server): each one passes on
what the plan promises and fails on what it does not, including the holes a verdict on nothing
would hide (zero operations, hung ones, a trailing stall)."""

from __future__ import annotations

import time

import pytest

from srht_readonly.drill import verdicts
from srht_readonly.drill.coverage import Coverage
from srht_readonly.drill.ledger import LedgerResult
from srht_readonly.drill.recorder import Event, Outcome, Recorder, State
from srht_readonly.drill.scenarios import Fact

OK, DROPPED, EXPLAINED, ERROR = Outcome.OK, Outcome.DROPPED, Outcome.EXPLAINED, Outcome.ERROR
RO, W, DOWN = State.READ_ONLY, State.WRITABLE, State.UNAVAILABLE

#: readonly-failover: read-only from 10 s to 20 s (promotion started), promotion verified at 21 s.
FAILOVER = {"read_only_from": 10.0, "window_closing": 20.0, "read_only_until": 21.0, "back_at": 21.0,
            "states": [["read-only", 10.0, 20.0]]}
#: primary-crash: killed at 10 s, failover done at 11 s, promoted at 13 s.
CRASH = {"crash_at": 10.0, "failover_at": 11.0, "promoted_at": 13.0, "back_at": 13.0,
         "states": [["unavailable", 10.0, 11.0], ["read-only", 11.0, 12.5]]}


def ev(op: str, start: float, end: float, outcome: Outcome = OK, *, write: bool = False, met: State | None = None,
       service: str = "ssh") -> Event:
    return Event(end, service, op, outcome, end - start, write, "", met)


def steady(op: str, *, write: bool, every: float = 1.0, until: float = 30.0, **kw) -> list[Event]:
    """One ``op`` per ``every`` seconds from 0 to ``until``, as the plan wants it in FAILOVER."""
    out = []
    t = 0.5
    while t < until:
        inside = 10.0 <= t < 20.0
        if write:
            out.append(ev(op, t, t + 0.4, DROPPED if inside else OK, write=True, met=RO if inside else W, **kw))
        else:
            out.append(ev(op, t, t + 0.4, OK, **kw))
        t += every
    return out


def verdict(checks, text: str):
    (check,) = [c for c in checks if c.text.startswith(text)]
    return check


def failover_checks(events, kinds=("push", "fetch")):
    return verdicts.common("ssh", "readonly-failover", events, FAILOVER, kinds=kinds)


def test_a_healthy_read_only_failover_passes_every_check():
    events = steady("push", write=True) + steady("fetch", write=False)
    checks = failover_checks(events)
    assert all(c.passed for c in checks), [(c.text, c.observed) for c in checks if not c.passed]


CASES = {
    # name: (events, the check that must fail)
    "zero operations of a kind in the window": (
        [e for e in steady("push", write=True) if not 9.0 < e.t < 21.0] + steady("fetch", write=False),
        "ssh: every kind of operation met the read-only state"),
    "a write in the window that did not get the explanation": (
        steady("push", write=True) + steady("fetch", write=False) + [ev("push", 12.0, 13.0, ERROR, write=True)],
        "ssh: traffic ran and no user saw an unexplained error"),
    "a write in the window that went through and observed nothing": (
        steady("push", write=True) + steady("fetch", write=False) + [ev("push", 12.0, 13.0, OK, write=True)],
        "ssh: writes that met the read-only state were refused with the explanation or dropped"),
    "a write observed read-only that was neither refused nor dropped": (
        steady("push", write=True) + steady("fetch", write=False) + [ev("push", 19.0, 22.0, OK, write=True, met=RO)],
        "ssh: writes that met the read-only state were refused with the explanation or dropped"),
    "an error after the grace period": (
        steady("push", write=True) + steady("fetch", write=False) + [ev("fetch", 25.0, 25.5, ERROR)],
        "ssh: everything works from 2 s after the promotion"),
    "a kind that never worked again after the promotion": (
        [e for e in steady("push", write=True) if e.t < 22.0] + steady("fetch", write=False),
        "ssh: every kind of operation worked again after the promotion"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_failover_verdict_fails_on_what_it_guards(case):
    events, text = CASES[case]
    check = verdict(failover_checks(events), text)
    assert not check.passed, (check.text, check.observed)
    assert check.evidence or "none for" in check.observed  # the report can show what decided it


def test_operations_straddling_the_window_are_judged_by_what_they_observed():
    # A slow push that began while writable and ended read-only (webhooks dropped): it met the
    # read-only state. One that began before and recorded everything while writable is not judged.
    # Neither lies wholly inside the window: before, a window "holding none" passed on nothing.
    events = [
        ev("push", 8.0, 12.0, DROPPED, write=True, met=RO),
        ev("push", 9.5, 10.5, OK, write=True, met=W),
        ev("push", 18.0, 23.0, DROPPED, write=True, met=RO),
        ev("fetch", 9.0, 14.0, OK), ev("fetch", 19.5, 24.0, OK),  # observed nothing: the state at its start
        ev("push", 24.0, 25.0, OK, write=True, met=W), ev("fetch", 24.0, 25.0, OK),
    ]
    checks = failover_checks(events)
    assert all(c.passed for c in checks), [(c.text, c.observed) for c in checks if not c.passed]
    met = verdict(checks, "ssh: every kind of operation met the read-only state")
    assert met.observed == "push 2, fetch 1", met.observed


def test_a_write_that_observed_a_writable_database_met_one_whatever_the_clock_says():
    # A push inside the window whose hook recorded everything: its connection still reached the old
    # primary (a server connection PgBouncer had not closed yet). Judged by what it met, it is fine
    # for the service; the ledger's own check stays strict about acknowledged writes in the window.
    events = steady("push", write=True) + steady("fetch", write=False) + [ev("push", 12.0, 13.0, OK, write=True, met=W)]
    assert all(c.passed for c in failover_checks(events))
    recorder = Recorder()
    recorder._events = [ev("write", 12.0, 12.1, OK, write=True, met=W, service="database"),
                        ev("write", 13.0, 13.1, EXPLAINED, write=True, met=RO, service="database")]
    check = verdict(verdicts.database("readonly-failover", recorder, FAILOVER, LedgerResult(1)),
                    "writes in the read-only window were refused")
    assert not check.passed and check.evidence[0].outcome is OK


def test_the_major_upgrades_window_ends_where_the_fleets_return_began_not_where_it_was_verified():
    # The return to the upgraded primary began at 20 s (window_closing) and was verified at 21 s: a
    # write acknowledged at 20.5 s went through a PgBouncer already back, and is no finding. One
    # acknowledged at 19.5 s is; so is any without the closing fact (the window then runs to 21 s).
    facts = {"read_only_from": 10.0, "window_closing": 20.0, "read_only_until": 21.0, "back_at": 21.0,
             "states": [["read-only", 10.0, 21.0]]}
    text = "writes in the read-only window were refused"
    for written, closing, passed in ((20.4, True, True), (19.4, True, False), (20.4, False, False)):
        recorder = Recorder()
        recorder._events = [ev("write", 12.0, 12.1, EXPLAINED, write=True, met=RO, service="database"),
                            ev("write", written, written + 0.1, OK, write=True, met=W, service="database")]
        judged = facts if closing else {k: v for k, v in facts.items() if k != "window_closing"}
        check = verdict(verdicts.database("major-upgrade", recorder, judged, LedgerResult(2)), text)
        assert check.passed is passed, (written, closing, check.observed)


def test_two_loops_in_step_each_judged_on_its_own_operations():
    # Two loops of one kind starting together: the pooled median gap is ~0, which once demanded
    # operations the window could not hold. Now each kind must simply have met the state.
    loop = steady("push", write=True, every=3.0)
    twin = [ev(e.op, e.started + 0.05, e.t + 0.05, e.outcome, write=True, met=e.met) for e in loop]
    checks = failover_checks(loop + twin + steady("fetch", write=False))
    assert all(c.passed for c in checks), [(c.text, c.observed) for c in checks if not c.passed]


def test_no_traffic_at_all_fails_instead_of_passing_on_nothing():
    for scenario, facts in (("switchover", {}), ("readonly-failover", FAILOVER), ("primary-crash", CRASH)):
        checks = verdicts.common("ssh", scenario, [], facts, kinds=("push",))
        assert not all(c.passed for c in checks), scenario


def test_undisturbed_scenarios_require_every_kind_to_work():
    events = steady("fetch", write=False)
    check = verdict(verdicts.common("ssh", "switchover", events, {}, kinds=("push", "fetch")),
                    "ssh: every kind of operation worked")
    assert not check.passed and "none for push" in check.observed


def test_crash_errors_only_while_the_primary_was_dead():
    events = [ev("push", 9.5, 10.5, ERROR, write=True), ev("push", 11.0, 12.0, ERROR, write=True),
              ev("push", 16.0, 17.0, OK, write=True, met=W)]
    checks = verdicts.common("ssh", "primary-crash", events, CRASH, kinds=("push",))
    assert all(c.passed for c in checks), [(c.text, c.observed) for c in checks if not c.passed]
    late = [*events, ev("push", 14.0, 14.5, ERROR, write=True)]  # after failover + GRACE
    check = verdict(verdicts.common("ssh", "primary-crash", late, CRASH, kinds=("push",)),
                    "ssh: errors only from operations under way")
    assert not check.passed and check.evidence[0].started == 14.0


def test_a_hung_operation_is_an_error_with_its_kind_and_age():
    recorder = Recorder()
    hung = recorder.begin("celery", "deliver", write=True, started=time.monotonic() - 5)
    fresh = recorder.begin("celery", "deliver", write=True)  # queued a moment ago: not judged
    recorder.record("celery", "deliver", OK, started=time.monotonic() - 0.1, write=True)
    (event,) = recorder.close(grace=2.0)
    assert event.outcome is ERROR and event.op == "deliver" and event.latency >= 5 and "hung" in event.detail
    assert recorder.end(hung, OK) is None and recorder.end(fresh, OK) is None  # too late to count
    check = verdict(verdicts.common("celery", "switchover", recorder.events, {}, kinds=("deliver",)),
                    "celery: traffic ran and no user saw an error")
    assert not check.passed and check.evidence == [event]


def test_the_longest_write_gap_counts_a_trailing_stall():
    recorder = Recorder()
    recorder.traffic_from = 0.0
    recorder._events = [Event(t / 10, "database", "write", OK, 0.01, True) for t in range(1, 30)]  # until 2.9 s
    recorder.traffic_until = 3.0
    assert recorder.longest_write_gap("database") == pytest.approx(0.1)
    recorder.traffic_until = 8.0  # writes stopped at 2.9 s (a PgBouncer left paused), the traffic ran on
    assert recorder.longest_write_gap("database") == pytest.approx(5.1)
    checks = verdicts.database("switchover", recorder, {}, LedgerResult(29))
    assert not verdict(checks, "longest write gap under 1 s").passed
    recorder.traffic_from = -2.0  # and a stall at the start counts too
    recorder.traffic_until = 3.0
    assert recorder.longest_write_gap("database") == pytest.approx(2.1)


def test_a_lost_write_fails_a_planned_scenario_and_an_unexplained_one_a_crash():
    recorder = Recorder()
    lost = {"writer": 1, "seq": 7, "lsn": "0/3000000", "committed_before": "0/3000100"}
    assert not verdict(verdicts.database("switchover", recorder, {}, LedgerResult(10, [lost])),
                       "no acknowledged write lost").passed
    facts = {**CRASH, "standby_received": "0/3000200"}  # the standby had received its commit: not explained
    assert not verdict(verdicts.database("primary-crash", recorder, facts, LedgerResult(10, [lost])),
                       "every lost write was committed past").passed
    facts["standby_received"] = "0/3000050"  # committed past what the standby had: asynchronous replication
    assert verdict(verdicts.database("primary-crash", recorder, facts, LedgerResult(10, [lost])),
                   "every lost write was committed past").passed


def test_kinds_missing_drives_how_long_a_state_is_held():
    kinds = {"ssh": ("push", "fetch"), "database": ("write",)}
    facts = {"states": [["read-only", 10.0, None]], "back_at": 0.0}
    events = [ev("fetch", 11.0, 12.0), ev("write", 10.5, 10.6, EXPLAINED, write=True, met=RO, service="database")]
    assert verdicts.kinds_missing(events, kinds, "met-read-only", facts) == ["ssh push"]
    events.append(ev("push", 9.0, 13.0, DROPPED, write=True, met=RO))  # started before, observed it
    assert verdicts.kinds_missing(events, kinds, "met-read-only", facts) == []
    # A build waiting in the read-only state ends only after it: under way there for GRACE, it met it.
    kinds = {**kinds, "builds": ("build",)}
    assert verdicts.kinds_missing(events, kinds, "met-read-only", facts, in_flight=[("builds", "build", 11.0)],
                                  now=12.0) == ["builds build"]
    assert verdicts.kinds_missing(events, kinds, "met-read-only", facts, in_flight=[("builds", "build", 11.0)],
                                  now=13.5) == []
    assert verdicts.kinds_missing(events, kinds, "met-read-only", facts, in_flight=[("builds", "build", 8.0)],
                                  now=13.5) == ["builds build"]  # began while writable
    facts = {**FAILOVER}
    kinds = {"ssh": ("push", "fetch"), "database": ("write",)}
    assert verdicts.kinds_missing([ev("push", 22.0, 23.0, OK, write=True)], kinds, "worked-again", facts) \
        == ["ssh push", "ssh fetch", "database write"]  # 22 s is before back_at + GRACE
    with pytest.raises(ValueError):
        verdicts.kinds_missing([], kinds, "soon", facts)


def test_state_at_follows_the_scenario_windows():
    assert verdicts.state_at(5.0, CRASH) is W
    assert verdicts.state_at(10.5, CRASH) is DOWN
    assert verdicts.state_at(12.0, CRASH) is RO
    assert verdicts.state_at(12.5, CRASH) is W


def test_coverage_reads_what_is_new_and_knows_how_slow_each_kind_is():
    recorder = Recorder()
    coverage = Coverage(recorder, {"ssh": ("push",), "builds": ("build",)}, waiting=["builds"])
    facts = {"states": [["read-only", -10.0, None]]}  # since before the recorder's start
    assert coverage.missing("met-read-only", facts) == ["ssh push", "builds build"]
    build = recorder.begin("builds", "build", write=True, started=time.monotonic() - 3)  # waiting in the state
    push = recorder.begin("ssh", "push", write=True, started=time.monotonic() - 3)  # under way: not enough
    assert coverage.missing("met-read-only", facts) == ["ssh push"]
    recorder.end(push, DROPPED, met=RO)
    assert coverage.missing("met-read-only", facts) == []
    assert 3.0 <= coverage.slowest(["ssh push"]) < 4.0  # ended after 3 s
    assert coverage.slowest(["builds build"]) == 0.0  # under way: says nothing of the machine yet
    recorder.end(build, OK)
    assert 3.0 <= coverage.slowest(["builds build"]) < 4.0
    facts = {"states": [["read-only", -10.0, 0.5]], "back_at": 0.5}  # the window closed: counted anew
    assert coverage.missing("worked-again", facts) == ["ssh push", "builds build"]


def test_a_kind_is_settled_once_it_keeps_ending_operations_off_the_goal_and_has_none_under_way():
    recorder = Recorder()
    coverage = Coverage(recorder, {"web": ("create",), "ssh": ("push",)})
    recorder.end(recorder.begin("web", "create"), ERROR)  # before the hold: not counted
    coverage.mark()
    for _ in range(2):
        recorder.end(recorder.begin("web", "create"), ERROR)
    assert not coverage.settled(["web create"])  # two: not yet
    recorder.end(recorder.begin("web", "create"), ERROR)
    assert coverage.settled(["web create"])
    push = recorder.begin("ssh", "push")
    for _ in range(3):
        recorder.end(recorder.begin("ssh", "push"), ERROR)
    assert not coverage.settled(["ssh push"])  # one still under way: it may yet reach the goal
    assert not coverage.settled(["web create", "ssh push"])
    recorder.end(push, ERROR)
    assert coverage.settled(["web create", "ssh push"])
    assert not coverage.settled([])  # nothing to judge is never settled
    # A write held by a paused PgBouncer, however long: under way, never settled.
    coverage.mark()
    recorder.begin("database", "write", started=time.monotonic() - 30.0)
    for _ in range(3):
        recorder.end(recorder.begin("database", "write"), ERROR)
    assert not coverage.settled(["database write"])


@pytest.mark.parametrize("settles, longest", [(True, 4.5), (False, 25.0)])
def test_hold_until_stops_early_only_when_the_missing_kinds_are_settled(monkeypatch, settles, longest):
    from srht_readonly.drill import scenarios

    class Stuck:
        def missing(self, goal, facts):
            return ["web create"]

        def slowest(self, kinds):
            return 0.1

        def mark(self):
            pass

        def settled(self, kinds):
            return settles

    monkeypatch.setattr(scenarios, "EXTRA_HOLD", 20.0)
    clock = [0.0]
    monkeypatch.setattr(scenarios.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(scenarios.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    step = scenarios.Step(None, Recorder(), 0.0, progress=Stuck())
    step.hold_until("worked-again")
    assert scenarios.SETTLED_HOLD <= clock[0] <= longest
    assert step.facts["never"] == {"worked-again": ["web create"]}


def test_the_web_judge_counts_a_saved_write_as_writable_even_after_a_dropped_last_seen_update():
    """A request straddling the promotion: its last-seen update dropped (header), its own write saved (302)."""
    import requests

    from integrations.drill.web import HEADER, judge
    from srht_readonly.drill.recorder import Outcome, State

    def response(status: int, read_only: bool) -> requests.Response:
        r = requests.Response()
        r.status_code = status
        if read_only:
            r.headers[HEADER] = "true"
        return r

    assert judge(response(302, True), write=True)[::2] == (Outcome.OK, State.WRITABLE)
    assert judge(response(201, False), write=True)[::2] == (Outcome.OK, State.WRITABLE)
    assert judge(response(200, True))[::2] == (Outcome.DROPPED, State.READ_ONLY)  # a page read while read-only
    assert judge(response(200, False))[::2] == (Outcome.OK, State.WRITABLE)


UPGRADED = {"remilia": {"version": "18.6", "role": "primary", "streaming": False},
            "konpaku": {"version": "18.6", "role": "standby", "streaming": True}}


@pytest.mark.parametrize("versions, passed", [
    (UPGRADED, True),
    ({**UPGRADED, "konpaku": {"version": "15.20", "role": "standby", "streaming": True}}, False),  # not rebuilt
    ({**UPGRADED, "konpaku": {"version": "18.6", "role": "standby", "streaming": False}}, False),  # not streaming
    ({**UPGRADED, "konpaku": {"version": None, "role": "down"}}, False),
    ({**UPGRADED, "konpaku": {"version": "18.6", "role": "primary", "streaming": False}}, False),  # two primaries
    ({}, False),  # the scenario stopped before it looked: not reached, not passed
])
def test_the_major_upgrade_verdict_wants_both_nodes_on_the_new_major_and_the_standby_streaming(versions, passed):
    facts = {**FAILOVER, "upgrade": {"from": 15, "to": 18}, "versions": versions}
    check = verdict(verdicts.database("major-upgrade", Recorder(), facts, LedgerResult(10)),
                    "the fleet ends on PostgreSQL")
    assert check.passed is passed, check.observed


# -- the web front in primary-crash and readonly-failover (integrations/drill/web.py) -----------------


def _line(t: float, pid: int, kind: str, what: str, detail: str = "-"):
    from integrations.gitsrht.viewlog import Line

    return Line(t, pid, kind, what, detail)


def test_no_unsafe_view_once_the_first_worker_knew_passes_and_fails_on_one_late_view():
    from integrations.drill.web import LEARN_ALLOWANCE, unsafe_views_after_learning

    windows = [(10.0, 20.0)]
    learned = [_line(10.3, 1, "state", "read-only", "read_only"), _line(10.302, 2, "state", "read-only", "read_only")]
    refused = [ev("create", 12.0, 12.1, EXPLAINED, write=True, met=RO, service="web")]
    early = [_line(10.29, 1, "view", "POST", "git.create"),  # the write that taught worker 1
             _line(10.3 + LEARN_ALLOWANCE - 0.01, 2, "view", "POST", "git.create"),  # the news still on its way
             _line(12.0, 3, "view", "GET", "git.index")]  # a page: always runs
    good = unsafe_views_after_learning(learned + early, windows, refused)
    assert good.passed, good.observed
    late = unsafe_views_after_learning(learned + early + [_line(12.0, 3, "view", "POST", "git.settings")], windows,
                                       refused)
    assert not late.passed and "POST git.settings in 3" in late.observed


def test_no_unsafe_view_fails_when_no_worker_learned_or_nothing_unsafe_came():
    from integrations.drill.web import unsafe_views_after_learning

    windows = [(10.0, 20.0)]
    nobody = unsafe_views_after_learning([_line(12.0, 1, "view", "POST", "git.create")], windows, [])
    assert not nobody.passed and "no worker learned" in nobody.observed
    learned = [_line(10.5, 1, "state", "read-only", "read_only")]
    nothing_came = unsafe_views_after_learning(learned, windows, [ev("index", 12.0, 12.1, DROPPED, service="web")])
    assert not nothing_came.passed and "no unsafe request came" in nothing_came.observed
    assert not unsafe_views_after_learning(learned, [], []).passed  # the database never changed


def test_a_worker_already_read_only_when_the_window_opens_knew_from_its_start():
    from integrations.drill.web import changed_windows, unsafe_views_after_learning

    windows = changed_windows(CRASH)
    assert windows == [(10.0, 12.5)]  # unreachable, then read-only: one change
    before = [_line(9.0, 1, "state", "read-only", "unavailable"), _line(10.4, 2, "view", "POST", "git.create")]
    judged = unsafe_views_after_learning(before, windows, [ev("create", 11.0, 11.1, EXPLAINED, write=True,
                                                              service="web")])
    assert not judged.passed and "first worker knew at 10.00 s" in judged.observed


def test_every_page_answered_allows_a_503_only_before_the_database_could_be_reached_again():
    from integrations.drill.web import pages_answered

    pages = [ev("index", t, t + 0.1, OK, service="web") for t in (9.0, 10.5, 12.0, 14.0)]
    waited = ev("repo", 10.1, 10.9, ERROR, met=DOWN, service="web")  # gave up before the failover at 11 s
    assert pages_answered(pages + [waited], CRASH).passed
    too_late = ev("repo", 10.5, 11.6, ERROR, met=DOWN, service="web")  # the database answered again at 11 s
    assert not pages_answered(pages + [too_late], CRASH).passed
    no_retry_after = ev("repo", 10.1, 10.9, ERROR, met=None, service="web")
    assert not pages_answered(pages + [no_retry_after], CRASH).passed
    assert not pages_answered(pages + [waited], FAILOVER).passed  # never unreachable: no 503 is allowed
    assert not pages_answered([ev("index", 1.0, 1.1, OK, service="web")], CRASH).passed  # none across the change


# -- the services' scraped metrics (integrations/drill/_metrics.py) ------------------------------


def _scraped(*, refused: float, gauge: list[tuple[float, float]], failed: bool = False):
    from integrations.drill._metrics import WRITES, ScrapedMetrics

    m = ScrapedMetrics("git.sr.ht", "http://127.0.0.1:1/metrics")
    series = (WRITES, (("outcome", "refused"), ("policy", "abort"), ("service", "git.sr.ht")))
    m.first, m.last = {series: 5.0}, {series: 5.0 + refused}
    m.read_only, m.scrapes = gauge, len(gauge) + 2
    if failed:
        m.failed = [(12.0, "ConnectionError: refused")]
    return m


def test_scraped_metrics_must_agree_with_what_users_saw():
    refusals = [ev("create", t, t + 0.1, EXPLAINED, write=True, met=RO, service="web") for t in (11.0, 12.0, 13.0)]
    during = [(9.0, 0.0), (10.5, 1.0), (15.0, 1.0), (25.0, 0.0)]

    def judged(m, facts=FAILOVER, events=refusals):
        return m.expectation("readonly-failover", events, dict(facts), policy="abort", outcome="refused")

    assert judged(_scraped(refused=3, gauge=during)).passed
    assert not judged(_scraped(refused=2, gauge=during)).passed  # a refusal users saw was not counted
    assert not judged(_scraped(refused=3, gauge=[(9.0, 0.0), (25.0, 0.0)])).passed  # never read-only
    between = _scraped(refused=3, gauge=[(9.0, 0.0), (25.0, 0.0)])  # a short window between two scrapes,
    between.last[("srht_readonly_read_only_seconds_count", (("service", "git.sr.ht"),))] = 1.0  # but a period ended
    assert judged(between).passed
    assert not judged(_scraped(refused=3, gauge=during[:-1])).passed  # still read-only at the end
    assert not judged(_scraped(refused=3, gauge=during, failed=True)).passed  # a scrape failed
    assert not judged(_scraped(refused=0, gauge=during), events=[]).passed  # nothing refused: nothing to judge
    quiet = {"states": []}
    assert judged(_scraped(refused=0, gauge=[(1.0, 0.0), (9.0, 0.0)]), facts=quiet, events=[]).passed
    assert not judged(_scraped(refused=1, gauge=[(1.0, 0.0)]), facts=quiet, events=[]).passed
    facts: dict = dict(FAILOVER)
    _scraped(refused=3, gauge=during).expectation("readonly-failover", refusals, facts, policy="abort",
                                                  outcome="refused")
    assert facts["metrics"]["git.sr.ht"]["writes"] == {"abort/refused": 3.0}  # kept for the report


# --- soft-outage ------------------------------------------------------------------------------------

#: soft-outage: the primary throttled from 10 s to 14 s ("after" counts from 16 s).
SLOW = {"slow_from": 10.0, "slow_until": 14.0, "back_at": 14.0}
LOOKED = {"before": {"status": {"commit_seconds": 0.001, "slow": []},
                     "exporter": {"primary_commit_seconds": 0.002, "threshold": 0.1}},
          "during": {"status": {"commit_seconds": 0.4, "slow": ["node remilia: is slow: a tiny commit takes 400 ms"]},
                     "exporter": {"primary_commit_seconds": 0.35, "threshold": 0.1}}}
PROMTOOL = {"before": 100, "during": 10, "before_median": 0.001, "during_mean": 0.3, "fires": True, "quiet": True}


def slowed(*, during: float = 0.3, after: float = 0.004, outcome: Outcome = OK, until: float = 24.0) -> list[Event]:
    """Database writes and reads every 0.1 s: 4 ms each, ``during`` while throttled, ``after`` from 16 s."""
    out, t = [], 0.05
    while t < until:
        latency = during if 10.0 <= t < 14.0 else after if t >= 14.0 else 0.004
        for write in (True, False):
            out.append(ev("write" if write else "read", t, t + latency, outcome, write=write, service="database"))
        t += 0.1
    return out


def soft(events, facts=None, lost=()):
    facts = {**SLOW, "slow_primary": LOOKED, "promtool": PROMTOOL} if facts is None else facts
    return verdicts.database("soft-outage", _recorder(events), facts, LedgerResult(100, list(lost)))


def _recorder(events):
    r = Recorder()
    r._events = list(events)
    return r


def test_a_soft_outage_that_users_met_and_monitoring_saw_passes():
    checks = soft(slowed())
    assert all(c.passed for c in checks), [(c.text, c.observed) for c in checks if not c.passed]
    assert "30.0 ms" not in verdict(checks, "users met a soft outage").observed
    assert "(75x)" in verdict(checks, "users met a soft outage").observed


@pytest.mark.parametrize(("case", "text"), [
    # The throttle did nothing: the database was as fast as before.
    (dict(events=slowed(during=0.004)), "users met a soft outage"),
    # 4 ms -> 12 ms is 3x: not a soft outage by this verdict.
    (dict(events=slowed(during=0.012)), "users met a soft outage"),
    # Nothing observed while throttled (no traffic): a verdict on nothing fails.
    (dict(events=[e for e in slowed() if e.t <= 10.0 or e.started >= 16.0]), "users met a soft outage"),
    # Still slow after the release.
    (dict(events=slowed(after=0.2)), "latency back near the baseline"),
    # A slow database must not refuse or fail anything.
    (dict(events=slowed() + [ev("write", 11.0, 11.5, EXPLAINED, write=True, service="database")]),
     "database: no error and nothing refused"),
    (dict(events=slowed() + [ev("write", 11.0, 11.5, ERROR, write=True, service="database")]),
     "database: no error and nothing refused"),
    (dict(events=[], also=("users met", "latency back")), "database: no error and nothing refused"),
    # status did not flag it, or flagged it before the throttle too.
    (dict(facts={**SLOW, "promtool": PROMTOOL, "slow_primary": {**LOOKED, "during": {
        **LOOKED["during"], "status": {"commit_seconds": 0.05, "slow": []}}}}), "status flagged the slow primary"),
    (dict(facts={**SLOW, "promtool": PROMTOOL, "slow_primary": {**LOOKED, "before": {
        **LOOKED["before"], "status": LOOKED["during"]["status"]}}}), "status flagged the slow primary"),
    (dict(facts={**SLOW, "promtool": PROMTOOL}, also=("the exporter's",)), "status flagged the slow primary"),
    # The exporter's gauge stayed under the threshold, or was missing (no metrics extra).
    (dict(facts={**SLOW, "promtool": PROMTOOL, "slow_primary": {**LOOKED, "during": {
        **LOOKED["during"], "exporter": {"primary_commit_seconds": 0.05, "threshold": 0.1}}}}), "the exporter's"),
    (dict(facts={**SLOW, "promtool": PROMTOOL, "slow_primary": {**LOOKED, "during": {
        **LOOKED["during"], "exporter": {"error": "ModuleNotFoundError: prometheus_client", "threshold": 0.1}}}}),
     "the exporter's"),
    # The alert did not fire on what was measured, fired on the baseline, or promtool is missing.
    (dict(facts={**SLOW, "slow_primary": LOOKED, "promtool": {**PROMTOOL, "fires": False, "fires_output": "got:[]"}}),
     "the SrhtSoftOutage alert fires"),
    (dict(facts={**SLOW, "slow_primary": LOOKED, "promtool": {**PROMTOOL, "quiet": False}}),
     "the SrhtSoftOutage alert fires"),
    (dict(facts={**SLOW, "slow_primary": LOOKED, "promtool": {"error": "promtool is missing: apt-get install "
                                                                         "prometheus"}}),
     "the SrhtSoftOutage alert fires"),
    (dict(facts={**SLOW, "slow_primary": LOOKED}), "the SrhtSoftOutage alert fires"),
    (dict(lost=[{"writer": 1, "seq": 2, "lsn": "0/1"}]), "no acknowledged write lost"),
])
def test_each_soft_outage_verdict_fails_on_what_it_guards(case, text):
    checks = soft(case.get("events", slowed()), case.get("facts"), case.get("lost", ()))
    assert not verdict(checks, text).passed, verdict(checks, text).observed
    others = [c for c in checks if not c.text.startswith(text) and not c.passed]
    assert all(c.text.startswith(case.get("also", ())) for c in others), [(c.text, c.observed) for c in others]


def test_a_soft_outage_scenario_that_never_throttled_is_not_reached():
    checks = soft(slowed(), {})
    assert verdict(checks, "database: the scenario reached").observed == "not reached: slow_from, slow_until"


def test_soft_outage_services_owe_what_undisturbed_scenarios_owe():
    events = [ev("push", t, t + 3.0) for t in range(0, 24, 4)]
    assert all(c.passed for c in verdicts.common("ssh", "soft-outage", events, SLOW, kinds=("push",)))
    refused = events + [ev("push", 11.0, 13.0, EXPLAINED, write=True)]
    assert not verdict(verdicts.common("ssh", "soft-outage", refused, SLOW, kinds=("push",)),
                       "ssh: nothing refused").passed


def test_latency_phases_and_percentiles():
    from srht_readonly.drill import latency

    assert latency.phase_of(ev("w", 1.0, 9.0), 10.0, 14.0) == "before"
    assert latency.phase_of(ev("w", 8.0, 11.0), 10.0, 14.0) == "during"  # met the throttle in part
    assert latency.phase_of(ev("w", 13.9, 14.5), 10.0, 14.0) == "during"
    assert latency.phase_of(ev("w", 15.0, 15.1), 10.0, 14.0) is None  # the backlog drains: no phase
    assert latency.phase_of(ev("w", 16.0, 16.1), 10.0, 14.0) == "after"
    assert latency.percentile([5, 1, 4, 2, 3], 50) == 3 and latency.percentile(list(range(1, 101)), 95) == 95
    assert latency.percentile([], 50) is None
    figures = latency.figures(slowed(), SLOW)
    assert set(figures) == {"database", "database write"}
    assert figures["database write"]["during"]["p95"] == 0.3 and figures["database"]["before"]["p50"] == 0.004
    drawn = latency.points(slowed(), limit=100)["database"]
    assert 90 <= len(drawn) <= 100 and max(p[1] for p in drawn) == 0.3


def test_the_worked_goal_holds_a_baseline_of_every_kind():
    events = [ev("push", 0.0, 3.0), ev("fetch", 0.0, 1.0, ERROR)]
    missing = verdicts.kinds_missing(events, {"ssh": ("push", "fetch")}, "worked", {})
    assert missing == ["ssh fetch"]


def _reads(*spans: tuple[float, float], every: float = 0.1) -> list[Event]:
    """Database reads every ``every`` s over each ``(start, end)`` span (none in between)."""
    out = []
    for lo, hi in spans:
        for i in range(round((hi - lo) / every)):
            out.append(ev("read", lo + i * every, lo + i * every + 0.01, service="database"))
    return out


@pytest.mark.parametrize("spans, passed, observed", [
    (((0.0, 10.0), (11.2, 30.0)), True, "1.2"),     # the agents' failover 1.2 s after the kill at 10 s
    (((0.0, 10.1), (12.5, 30.0)), False, "2.5"),    # the read at 10.0 the dying primary answered is no "back"
    (((0.0, 10.0),), False, "never"),               # no read ever again
    (((0.0, 10.1),), False, "never"),               # ... even with one answered just after the kill
])
def test_unattended_reads_are_judged_from_the_kill_to_the_end_of_the_longest_stretch_without_one(
        spans, passed, observed):
    facts = {Fact.CRASH_AT: 10.0, Fact.FAILOVER_AT: 11.0, Fact.PROMOTED_AT: 20.0, Fact.STANDBY_RECEIVED: None}
    checks = verdicts.database("unattended-crash", _recorder(_reads(*spans)), facts, LedgerResult(10, []))
    (reads,) = [c for c in checks if c.text.startswith("reads restored within 2 s of the kill")]
    assert reads.passed is passed and reads.observed.startswith(observed), reads.observed


def test_unattended_a_read_held_in_pgbouncer_across_the_kill_ends_the_outage_when_it_is_answered():
    reads = _reads((0.0, 9.9)) + [ev("read", 9.95, 11.1, service="database")] + _reads((11.2, 30.0))
    facts = {Fact.CRASH_AT: 10.0, Fact.FAILOVER_AT: 11.0, Fact.PROMOTED_AT: 20.0, Fact.STANDBY_RECEIVED: None}
    checks = verdicts.database("unattended-crash", _recorder(reads), facts, LedgerResult(10, []))
    (back,) = [c for c in checks if c.text.startswith("reads restored within 2 s of the kill")]
    assert back.passed and back.observed == "1.10 s", back.observed


@pytest.mark.parametrize("promotions, writes_from, passed", [
    ({"git.sr.ht": ["promote: konpaku promoted"]}, 14.1, {"exactly one": True, "writes": True}),
    ({"git.sr.ht": ["promote: a"], "meta.sr.ht": ["promote: b"]}, 14.1, {"exactly one": False, "writes": True}),
    ({}, 14.1, {"exactly one": False, "writes": True}),                              # no agent said it promoted
    ({"git.sr.ht": ["promote: konpaku promoted"]}, 20.5, {"exactly one": True, "writes": False}),  # 10.5 s
    ({"git.sr.ht": ["promote: konpaku promoted"]}, None, {"exactly one": True, "writes": False}),   # never
])
def test_unattended_promote_judges_one_promotion_and_writes_back_within_10_s_of_the_kill(
        promotions, writes_from, passed):
    facts = {Fact.CRASH_AT: 10.0, Fact.FAILOVER_AT: 11.0, Fact.PROMOTED_AT: 14.0, Fact.STANDBY_RECEIVED: None,
             Fact.PROMOTIONS: promotions}
    # A write refused before the kill's outage ended, then acknowledged writes from ``writes_from`` on.
    events = _reads((0.0, 10.0), (11.2, 30.0)) + [ev("write", 11.5, 11.6, EXPLAINED, write=True, service="database")]
    if writes_from is not None:
        events += [ev("write", writes_from, writes_from + 0.01, write=True, service="database")]
    checks = verdicts.database("unattended-promote", _recorder(events), facts, LedgerResult(10, []))
    (one,) = [c for c in checks if c.text.startswith("exactly one agent promoted")]
    (writes,) = [c for c in checks if c.text.startswith("writes restored within 10 s of the kill")]
    assert one.passed is passed["exactly one"], one.observed
    assert writes.passed is passed["writes"], writes.observed

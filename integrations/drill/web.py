"""The git.sr.ht web front under a browser's and an API client's traffic.

The stand-in app (``integrations.gitsrht.web``) is served as sr.ht serves its web fronts: by
gunicorn, with ``WORKERS`` worker processes (``integrations.gitsrht.wsgi.Gunicorn``) on a
loopback port, its log in the drill's directory (``web/gunicorn.log``). The workers share what
they learn of the database through the Redis at ``REDIS_URL`` (``srht_readonly.shared_state``),
under a key prefix of this drill's own; without that Redis each worker learns by itself, as
before. Each client loop walks a user's round: the repository list, a repository's page, its
settings form, a new repository by form and one by the JSON API. What the user saw:

* ``ok``: the page (200) or the redirect after a form (302) or the API's 201;
* ``dropped``: a page served while read-only (``Srht-Read-Only: true``): the page works and its
  "last seen" update was dropped, as the plan allows;
* ``explained``: a write answered 503 with the read-only page (HTML) or ``READ_ONLY`` (JSON);
* ``error``: anything else, including the 503 "database unavailable" answer (a clean page, but
  not the read-only explanation: the database was away, not read-only), 500s and connection
  errors.

Each worker logs every view it runs and every change of its read-only monitor to
``web/views.log`` (``integrations.gitsrht.viewlog``). Besides what every service owes
(``verdicts.common``), the web front is judged in ``primary-crash``, the two ``unattended-*`` and
``readonly-failover`` on what transparent re-runs and the shared state promise (docs/drill.md,
"The web front"):

* every page (GET) answered: 200, or a 503 with ``Retry-After`` only where the database stayed
  unreachable for the whole re-run budget (answered before the read-only failover was done);
* no unsafe request reached a view once the first worker knew the database had changed, past
  ``LEARN_ALLOWANCE`` for the news to reach the others (``unsafe_views_after_learning``).
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import requests
from sqlalchemy import Engine

from integrations.gitsrht import viewlog
from integrations.gitsrht.web import init_db
from integrations.gitsrht.wsgi import Gunicorn
from srht_readonly.drill import Outcome, Recorder, State, verdicts
from srht_readonly.drill.recorder import Event
from srht_readonly.drill.scenarios import Expectation, Fact
from srht_readonly.drill.services import DrillEnvironment
from srht_readonly.flask import HEADER
from srht_readonly.rerun import SAFE_METHODS

from ._metrics import ScrapedMetrics
from ._traffic import Traffic

__all__ = ["WebTraffic"]

#: load -> (client loops, pause between requests in seconds)
LOADS = {"typical": (2, 0.2), "excessive": (4, 0.05)}
#: One user's round; creating repositories is rarer than reading, as on the real site.
ROUND = ("index", "repo", "settings", "index", "create", "repo", "api")
READS = ("index", "repo")  # the others write
TIMEOUT = 30
#: gunicorn's worker processes (sync workers, as sr.ht runs them).
WORKERS = 4
#: The workers' CPU priority. In production the web front has hosts of its own; here its 4 processes
#: share 2 cores with every other service, and at the excessive load they left the ssh pipeline
#: (4 Python processes per push) too little CPU for a fetch to end inside a held state.
NICE = 10
#: Where the workers share the read-only state (a hint: the drill works without it).
REDIS_URL = "redis://localhost:6379/0"
#: Scenarios whose web front is judged on re-runs and on learning the change together.
TOGETHER = (*verdicts.CRASHES, "readonly-failover")
#: Seconds the other workers get to hear what the first one learned (through Redis: p99 a few
#: ms here, benchmarks/shared_state.py; the issue's goal is 0.1 s), plus a busy 2-core machine.
LEARN_ALLOWANCE = 0.25


class WebTraffic(Traffic):
    """Serves the web front for the drill's lifetime and sends it a user's traffic."""

    name = "web"
    kinds = tuple(dict.fromkeys(ROUND))

    def __init__(self, env: DrillEnvironment, stack: contextlib.ExitStack, engine: Engine) -> None:
        threads, pause = LOADS[env.load]
        super().__init__(threads=threads, pause=pause)
        self.user = f"web-{uuid.uuid4().hex[:6]}"
        init_db(engine, self.user)
        self.server = Gunicorn(env.directory / "web", {
            "GITSRHT_DATABASE_URL": env.database_url, "GITSRHT_USER": self.user,
            "GITSRHT_REPOS": str(env.directory / "web-repos"), "GITSRHT_POOL_SIZE": "2",
            "GITSRHT_LOG_LEVEL": "INFO", "GITSRHT_VIEW_LOG": str(env.directory / "web" / "views.log"),
            # Sabotage "web-500": the same app without its read-only handling, as sr.ht was before the plan.
            "GITSRHT_READ_ONLY": "0" if env.sabotage == "web-500" else "1",
            "SRHT_READONLY_RECHECK": "0.5",
            "SRHT_READONLY_REDIS_URL": REDIS_URL, "SRHT_READONLY_SHARED_PREFIX": f"srht-readonly-drill-{self.user}",
            "PROMETHEUS_MULTIPROC_DIR": str(_empty_dir(env.directory / "web-metrics")),
        }, workers=WORKERS, nice=NICE)
        self.view_log = self.server.env["GITSRHT_VIEW_LOG"]
        stack.callback(self.server.stop)
        self.url = self.server.start(timeout=60)
        self.metrics = ScrapedMetrics("git.sr.ht", f"{self.url}/metrics")
        stack.callback(self.close)
        self._sessions = [requests.Session() for _ in range(threads)]
        for s in self._sessions:
            stack.callback(s.close)
        self._rounds = [itertools.cycle(ROUND) for _ in range(threads)]
        self._names = itertools.count()
        self.repo = "site"
        created = self._sessions[0].post(f"{self.url}/create", data={"name": self.repo}, allow_redirects=False,
                                         timeout=TIMEOUT)
        if created.status_code != 302:
            raise RuntimeError(f"the web front could not create {self.repo}: {created.status_code} "
                               f"{created.text[:200]}")

    def step(self, worker: int) -> None:
        op = next(self._rounds[worker])
        http = self._sessions[worker]
        repo = f"{self.url}/~{self.user}/{self.repo}"
        html = {"Accept": "text/html"}
        operation = self.begin(op, write=op not in READS)
        try:
            if op == "index":
                r = http.get(f"{self.url}/", headers=html, timeout=TIMEOUT)
            elif op == "repo":
                r = http.get(f"{repo}/", headers=html, timeout=TIMEOUT)
            elif op == "settings":
                r = http.post(f"{repo}/settings", data={"description": f"edit {next(self._names)}",
                                                        "visibility": "public"},
                              headers=html, allow_redirects=False, timeout=TIMEOUT)
            elif op == "create":
                r = http.post(f"{self.url}/create", data={"name": f"form-{next(self._names)}"}, headers=html,
                              allow_redirects=False, timeout=TIMEOUT)
            else:
                r = http.post(f"{self.url}/api/repos", json={"name": f"api-{next(self._names)}"}, timeout=TIMEOUT)
        except requests.RequestException as exc:
            self.end(operation, Outcome.ERROR, detail=f"connection error: {type(exc).__name__}")
            return
        outcome, detail, met = judge(r, write=op not in READS)
        self.end(operation, outcome, detail=detail, met=met)

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        events = verdicts.of_service(recorder.events, self.name)
        checks = verdicts.common(self.name, scenario, events, facts, kinds=self.kinds)
        self.metrics.finish(recorder)
        checks.append(self.metrics.expectation(scenario, events, facts, policy="abort", outcome="refused"))
        if scenario in verdicts.READ_ONLY_WINDOW and Fact.READ_ONLY_UNTIL in facts:
            hi = facts[Fact.READ_ONLY_UNTIL]
            inside = verdicts.judged_read_only(events, facts)
            checks.append(verdicts.all_are("web: every form and API write that met the read-only state got the "
                                           "read-only explanation (503)", [e for e in inside if e.write],
                                           (Outcome.EXPLAINED,)))
            checks.append(verdicts.all_are("web: pages kept working in the read-only state",
                                           [e for e in inside if not e.write], (Outcome.OK, Outcome.DROPPED)))
            back = verdicts.first(verdicts.after(events, hi), lambda e: e.write and e.outcome is Outcome.OK)
            checks.append(Expectation(f"web: writes accepted again within {verdicts.GRACE:g} s of the promotion",
                                      back is not None and back.t - hi <= verdicts.GRACE,
                                      "never" if back is None else f"{back.t - hi:.2f} s", [back] if back else []))
        if scenario in TOGETHER:
            checks.append(pages_answered(events, facts))
            windows = changed_windows(facts)
            lines = [line._replace(t=line.t - recorder.t0) for line in viewlog.read(self.view_log)]
            checks.append(unsafe_views_after_learning(lines, windows, events))
        return checks


def _empty_dir(path: Any) -> Any:
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.iterdir():
        stale.unlink()
    return path


def changed_windows(facts: dict[str, Any]) -> list[tuple[float, float]]:
    """The spans in which the services' database was not writable (read-only or unreachable, one
    after the other merged), from the scenario's ``states``."""
    spans = sorted((lo, float("inf") if hi is None else hi) for _, lo, hi in facts.get(Fact.STATES, []))
    merged: list[tuple[float, float]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def pages_answered(events: Sequence[Event], facts: dict[str, Any]) -> Expectation:
    """Every GET answered 200 (or served read-only), or 503 with ``Retry-After`` before the database
    could be reached again (``failover_at``): only then had it stayed unreachable past the budget."""
    reachable_again = facts.get(Fact.FAILOVER_AT, float("-inf"))
    pages = [e for e in events if e.op in READS]
    windows = changed_windows(facts)
    across = [e for e in pages if any(lo <= e.t and e.started < hi for lo, hi in windows)]
    wrong = [e for e in pages if e.outcome not in (Outcome.OK, Outcome.DROPPED)
             and not (e.met is State.UNAVAILABLE and e.t <= reachable_again)]
    waited = [e for e in pages if e.met is State.UNAVAILABLE and e not in wrong]
    observed = (f"{len(pages)} GETs ({len(across)} across the change), {len(waited)} answered 503 while the "
                f"database stayed unreachable, {verdicts.sample(wrong, 'failed')}")
    return Expectation("web: every page (GET) answered 200, or 503 with Retry-After only while the database stayed "
                       "unreachable past the re-run budget", bool(across) and not wrong, observed, wrong + across)


def unsafe_views_after_learning(lines: Iterable[viewlog.Line], windows: Sequence[tuple[float, float]],
                                events: Sequence[Event] = ()) -> Expectation:
    """No unsafe request's view ran in any worker once the first worker knew of the change.

    ``lines``: the workers' view log, its times in the scenario's frame. For each span of
    ``windows``, the first worker knew from the span's start if one was already read-only then,
    else from its first change to read-only inside the span; from ``LEARN_ALLOWANCE`` after that
    to the span's end, a view run for a method other than GET, HEAD or OPTIONS is a failure. A
    span in which no worker learned anything, or in which no unsafe request came after that, was
    not judged: that fails too.
    """
    lines = sorted(lines, key=lambda line: line.t)
    text = (f"web: no unsafe request reached a view once the first worker knew the database changed "
            f"(allowing {LEARN_ALLOWANCE:g} s for the others to hear it)")
    if not windows:
        return Expectation(text, False, "the database never changed: nothing to judge")
    found, notes = [], []
    judged = True
    for lo, hi in windows:
        knew = _first_knew(lines, lo, hi)
        if knew is None:
            judged = False
            notes.append(f"no worker learned of the change at {lo:.2f} s")
            continue
        since = knew + LEARN_ALLOWANCE
        late = [line for line in lines if line.kind == "view" and line.what not in SAFE_METHODS and since < line.t < hi]
        refused = [e for e in events if e.write and e.started > since and e.t < hi and e.outcome is Outcome.EXPLAINED]
        if not late and not refused and events:
            judged = False
            notes.append(f"no unsafe request came after {since:.2f} s")
        found += late
        notes.append(f"first worker knew at {knew:.2f} s; {len(late)} unsafe view run(s) after {since:.2f} s"
                     + (": " + ", ".join(f"{x.what} {x.detail} in {x.pid} at {x.t:.2f} s" for x in late[:3])
                        if late else f", {len(refused)} unsafe request(s) refused before their view"))
    return Expectation(text, judged and not found, "; ".join(notes))


def _first_knew(lines: Sequence[viewlog.Line], lo: float, hi: float) -> float | None:
    """When the first worker knew the database was not writable, in [lo, hi): ``lo`` if one already did."""
    last: dict[int, str] = {}
    for line in lines:
        if line.kind != "state":
            continue
        if line.t >= lo:
            if any(state == "read-only" for state in last.values()):
                return lo
            if line.t >= hi:
                return None
            if line.what == "read-only":
                return line.t
        last[line.pid] = line.what
    return lo if any(state == "read-only" for state in last.values()) else None


def judge(r: requests.Response, *, write: bool = False) -> tuple[Outcome, str, State | None]:
    """What the user made of response ``r`` (to a ``write``, or a read), and the state of the database it shows.

    A write answered 201 or 302 was saved, so the database took it, whatever the header says: a
    request that straddles the promotion may have had its last-seen update dropped at its start
    and its own write accepted at its end.
    """
    read_only = r.headers.get(HEADER) == "true"
    if write and r.status_code in (201, 302):
        return Outcome.OK, "saved" + (" (its last-seen update had been dropped)" if read_only else ""), State.WRITABLE
    if r.status_code in (200, 201, 302):
        if read_only:
            return Outcome.DROPPED, f"{r.status_code}, served read-only (last-seen update dropped)", State.READ_ONLY
        return Outcome.OK, "", State.WRITABLE
    if r.status_code == 503:
        # "Come back later" must say when: without Retry-After the answer does not count as one.
        retry_after = "" if r.headers.get("Retry-After") else " without Retry-After"
        unavailable = None if retry_after else State.UNAVAILABLE
        if "json" in r.headers.get("Content-Type", ""):
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                code = r.json()["errors"][0]["extensions"]["code"]
                if code == "READ_ONLY":
                    return Outcome.EXPLAINED, f"503 {code}", State.READ_ONLY
                return Outcome.ERROR, f"503 {code}" + retry_after, unavailable
        elif "<title>Read-only mode" in r.text:
            return Outcome.EXPLAINED, "503 read-only page", State.READ_ONLY
        elif "<title>Database unavailable" in r.text:
            return Outcome.ERROR, "503 database unavailable page" + retry_after, unavailable
    first_line = next((line.strip() for line in r.text.splitlines() if line.strip()), "")
    return Outcome.ERROR, f"{r.status_code}: {first_line[:120]}", State.READ_ONLY if read_only else None

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
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from typing import Any

import requests
from sqlalchemy import Engine

from integrations.gitsrht.web import init_db
from integrations.gitsrht.wsgi import Gunicorn
from srht_readonly.drill import Outcome, Recorder, State, verdicts
from srht_readonly.drill.scenarios import Expectation, Fact
from srht_readonly.drill.services import DrillEnvironment
from srht_readonly.flask import HEADER

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
#: Where the workers share the read-only state (a hint: the drill works without it).
REDIS_URL = "redis://localhost:6379/0"


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
            "GITSRHT_LOG_LEVEL": "INFO",
            # Sabotage "web-500": the same app without its read-only handling, as sr.ht was before the plan.
            "GITSRHT_READ_ONLY": "0" if env.sabotage == "web-500" else "1",
            "SRHT_READONLY_RECHECK": "0.5",
            "SRHT_READONLY_REDIS_URL": REDIS_URL, "SRHT_READONLY_SHARED_PREFIX": f"srht-readonly-drill-{self.user}",
        }, workers=WORKERS)
        stack.callback(self.server.stop)
        self.url = self.server.start(timeout=60)
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
        return checks


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
        if "json" in r.headers.get("Content-Type", ""):
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                code = r.json()["errors"][0]["extensions"]["code"]
                if code == "READ_ONLY":
                    return Outcome.EXPLAINED, f"503 {code}", State.READ_ONLY
                return Outcome.ERROR, f"503 {code}", State.UNAVAILABLE
        elif "<title>Read-only mode" in r.text:
            return Outcome.EXPLAINED, "503 read-only page", State.READ_ONLY
        elif "<title>Database unavailable" in r.text:
            return Outcome.ERROR, "503 database unavailable page", State.UNAVAILABLE
    first_line = next((line.strip() for line in r.text.splitlines() if line.strip()), "")
    return Outcome.ERROR, f"{r.status_code}: {first_line[:120]}", State.READ_ONLY if read_only else None

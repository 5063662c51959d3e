"""The git.sr.ht stand-in under real gunicorn (4 sync workers), a real Redis and the lab, through PgBouncer.

* After one worker learns that the database is read-only (its own refused write), every other
  worker refuses unsafe requests before the view (each view run is logged to a file by
  ``tests/_web_app.py``; every response names its worker).
* Redis killed during a failover: no worker stays read-only once the database takes writes
  again, and with Redis down each worker lets at most one refused write reach its view.
* GETs across a ``kill -9`` of the primary and a read-only failover (PgBouncer repointed at the
  standby within the retry budget) are all answered 200.

The lab is this module's own (the last test kills its primary). The first test runs gunicorn as
sr.ht does (each worker makes the app); the others with ``--preload`` (the app made once and
forked: the monitor and the shared state renew their threads in each worker), which also
starts in a fraction of the time.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from integrations.gitsrht.web import init_db
from integrations.gitsrht.wsgi import Gunicorn
from srht_readonly.sqlalchemy import create_engine
from srht_readonly.testing import factories
from tests._db import bouncer_on_standby
from tests._redis import PrivateRedis
from tests._web_app import FACTORY, view_runs

WORKERS = 4
RECHECK = 0.3

gunicorn_lab = factories.lab("module")


@pytest.fixture(scope="module")
def app_db(gunicorn_lab: Any) -> str:
    engine = create_engine(gunicorn_lab.primary.url)
    init_db(engine, "alice")
    engine.dispose()
    return gunicorn_lab.pgbouncer.url


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def serve(directory: Path, database_url: str, redis_url: str | None, *, preload: bool = False) -> Iterator[Gunicorn]:
    env = {
        "GITSRHT_DATABASE_URL": database_url, "GITSRHT_VIEW_LOG": str(directory / "views"),
        "GITSRHT_REPOS": str(directory / "repos"), "SRHT_READONLY_RECHECK": str(RECHECK),
    }
    if redis_url is not None:
        env.update(SRHT_READONLY_REDIS_URL=redis_url, SRHT_READONLY_SHARED_PREFIX=f"test-{uuid.uuid4().hex[:8]}")
    server = Gunicorn(directory, env, workers=WORKERS, factory=FACTORY, preload=preload)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def create(url: str) -> requests.Response:
    return requests.post(f"{url}/create", data={"name": f"r-{uuid.uuid4().hex[:8]}"}, headers={"Accept": "text/html"},
                         allow_redirects=False, timeout=15)


def spread(server: Gunicorn, send: Callable[[str], requests.Response], *, each: int = 2) -> list[requests.Response]:
    """Concurrent requests until every worker has answered at least ``each`` of them."""
    responses: list[requests.Response] = []
    workers = set(server.worker_pids())
    with ThreadPoolExecutor(8) as pool:
        for _ in range(20):
            responses += pool.map(lambda _: send(server.url), range(16))
            answered = collections.Counter(int(r.headers["X-Worker"]) for r in responses)
            if all(answered[w] >= each for w in workers):
                return responses
    raise AssertionError(f"not every worker answered: {answered} of {workers}")


def read_only_page(r: requests.Response) -> bool:
    return r.status_code == 503 and "<title>Read-only mode" in r.text and r.headers.get("Retry-After") is not None


def create_runs(server: Gunicorn) -> list[int]:
    """The pids of the workers whose /create view ran for a POST, in order."""
    return [pid for pid, method, endpoint in view_runs(server.env["GITSRHT_VIEW_LOG"])
            if method == "POST" and endpoint == "git.create"]


def all_writable_within(server: Gunicorn, seconds: float) -> float:
    """Seconds until a round of POSTs reaching every worker is all saved (302)."""
    started = time.monotonic()
    while True:
        responses = spread(server, create, each=1)
        if all(r.status_code == 302 for r in responses):
            return time.monotonic() - started
        assert all(r.status_code in (302, 503) for r in responses), [r.status_code for r in responses]
        if time.monotonic() - started > seconds:
            stuck = {r.headers["X-Worker"] for r in responses if r.status_code != 302}
            raise AssertionError(f"workers {stuck} still refuse writes {seconds} s after the database took them again")
        time.sleep(0.05)


def test_after_one_worker_learns_read_only_every_worker_refuses_writes_before_the_view(gunicorn_lab, app_db,
                                                                                         module_redis, tmp_path):
    with serve(tmp_path, app_db, module_redis.url) as server:
        assert create(server.url).status_code == 302
        with bouncer_on_standby(gunicorn_lab):
            first = create(server.url)
            assert read_only_page(first)  # its view ran, and its worker learned from the refused INSERT
            runs = create_runs(server)
            assert runs[-1] == int(first.headers["X-Worker"])
            time.sleep(0.2)  # the hint's way through Redis (p99 well under 0.1 s: benchmarks/shared_state.py)
            responses = spread(server, create)
            assert all(read_only_page(r) for r in responses), [r.status_code for r in responses]
            assert create_runs(server) == runs  # no view ran in any worker: all refused before it
        all_writable_within(server, 3.0)


def test_redis_killed_during_a_failover_nothing_stuck_at_most_one_extra_refused_write_per_worker(gunicorn_lab, app_db,
                                                                                                  tmp_path):
    redis = PrivateRedis(tmp_path / "redis").start()
    try:
        with serve(tmp_path, app_db, redis.url, preload=True) as server:
            with bouncer_on_standby(gunicorn_lab):
                assert read_only_page(create(server.url))
                time.sleep(0.2)
                redis.kill()  # every worker is read-only by the hint; nobody will hear the promotion
            took = all_writable_within(server, 3.0)  # each worker's own recheck found it writable
            assert took < 3.0
            with bouncer_on_standby(gunicorn_lab):  # a second failover, Redis still down
                before = len(create_runs(server))
                responses = spread(server, create, each=3)
                assert all(read_only_page(r) for r in responses), [r.status_code for r in responses]
                refused_in_view = collections.Counter(create_runs(server)[before:])
            assert max(refused_in_view.values()) <= 1, refused_in_view  # one refused write per worker at most
            assert sum(refused_in_view.values()) >= 2, refused_in_view  # each learned alone (Redis would spare it)
            all_writable_within(server, 3.0)
            assert "Redis" in server.log_tail(200) and "Traceback" not in server.log_tail(400)
    finally:
        redis.kill()


def test_gets_across_a_kill_9_of_the_primary_and_a_read_only_failover_are_all_answered_200(gunicorn_lab, app_db,
                                                                                            module_redis, tmp_path):
    lab = gunicorn_lab
    primary, standby = lab.primary, lab.standby
    with serve(tmp_path, app_db, module_redis.url, preload=True) as server:
        site = requests.post(f"{server.url}/create", data={"name": f"site-{uuid.uuid4().hex[:6]}"},
                             allow_redirects=False, timeout=15)
        assert site.status_code == 302
        pages = ("/", site.headers["Location"])
        lab.wait_caught_up(timeout=10)
        answers: list[tuple[float, int, bool, str]] = []
        slow: list[str] = []
        started = time.monotonic()
        stop = threading.Event()

        def browse() -> None:
            while not stop.is_set():
                for page in pages:
                    sent = time.monotonic()
                    try:
                        r = requests.get(f"{server.url}{page}", headers={"Accept": "text/html"}, timeout=20)
                        answers.append((sent, r.status_code, r.headers.get("Srht-Read-Only") == "true",
                                        f"worker {r.headers.get('X-Worker')}: {r.text[:200]}"))
                    except requests.RequestException as exc:
                        answers.append((sent, 0, False, repr(exc)))
                    took = time.monotonic() - sent
                    if took > 2.5:  # longer than a re-run's budget allows: keep what explains it
                        slow.append(f"{page} sent {sent - started:.2f} s in, took {took:.2f} s")

        browsers = [threading.Thread(target=browse, daemon=True) for _ in range(4)]
        for b in browsers:
            b.start()
        time.sleep(0.8)
        primary.kill()  # kill -9 of the postmaster: its backends die under the requests in flight
        killed = time.monotonic()
        time.sleep(0.5)  # an operator (or a watchdog) notices
        lab.pgbouncer.point_at(standby)  # the read-only failover
        failed_over = time.monotonic()
        time.sleep(1.5)
        stop.set()
        for b in browsers:
            b.join(30)
        log = server.log_tail(2000)
    during = [a for a in answers if a[0] >= killed]
    failed = [a for a in answers if a[1] != 200]
    reruns = log.count("re-running GET")
    print(f"\nkill -9 + failover: {len(answers)} GETs ({len(during)} after the kill), {len(failed)} failed, "
          f"{reruns} re-run(s), failover {failed_over - killed:.2f} s after the kill")
    if failed or slow:  # what the server and PgBouncer saw, relative to the kill
        bouncer_log = lab.pgbouncer.config_path.parent / "pgbouncer.log"
        print(f"kill at {killed - started:.2f} s, failover at {failed_over - started:.2f} s; slow GETs: {slow}")
        print("gunicorn.log:", log[-6000:], sep="\n")
        print("pgbouncer.log:", *bouncer_log.read_text(errors="replace").splitlines()[-80:], sep="\n")
    assert failed == [], failed[:5]
    assert any(read_only for t, _, read_only, _ in answers if t > failed_over)  # served by the standby
    assert len(during) >= 8

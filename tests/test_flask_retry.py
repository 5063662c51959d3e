"""The Flask adapter's transparent retry, on real servers: a request's backend is terminated under it.

The git.sr.ht stand-in (through the shared lab's PgBouncer, as in production) gets a few extra
views whose database work includes ``SELECT /* victim */ pg_sleep(...)``; a thread of the test
terminates that backend once (``pg_terminate_backend``), so the request loses its connection
mid-query exactly as when a primary dies under it. Each view counts its runs. Each rule has its
case that must be re-run and its case that must not (docs/flask.md#transparent-retry).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import flask
import pytest
from sqlalchemy import create_engine, text

from integrations.gitsrht.web import create_app, init_db
from srht_readonly.flask import no_retry
from srht_readonly.ops import sql
from srht_readonly.ops.ports import free_port

VICTIM = "SELECT /* victim */ pg_sleep(0.4)"


@pytest.fixture(scope="module")
def retry_db(srht_lab: Any) -> Iterator[tuple[str, str]]:
    """(URL through PgBouncer, admin DSN of the primary) of a database of our own, with a table."""
    primary = srht_lab.primary
    name = f"flask_retry_{uuid.uuid4().hex[:8]}"
    sql.execute(primary.admin_dsn, f'CREATE DATABASE "{name}" OWNER srht')
    try:
        engine = create_engine(f"postgresql://srht@127.0.0.1:{primary.port}/{name}")
        init_db(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE note (v text)")
        engine.dispose()
        yield f"postgresql://srht@127.0.0.1:{srht_lab.pgbouncer.port}/{name}", primary.admin_dsn
    finally:
        sql.execute(primary.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Killer(threading.Thread):
    """Terminates the first backend seen running the victim query, ``times`` times."""

    def __init__(self, admin_dsn: str, times: int = 1) -> None:
        super().__init__(daemon=True)
        self.admin_dsn = admin_dsn
        self.times = times
        self.killed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while self.killed < self.times and not self.stop.is_set():
            rows = sql.query(self.admin_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                             "pid <> pg_backend_pid() AND state = 'active' AND query LIKE %s", ("%/* victim */%",))
            self.killed += sum(1 for (done,) in rows if done)
            time.sleep(0.01)


def build(url: str, **config: Any) -> tuple[flask.Flask, dict[str, int]]:
    app = create_app(url, config={"TESTING": True, "SRHT_READONLY_RECHECK": 0.3, **config})
    db = app.extensions["gitsrht.db"]
    runs: dict[str, int] = {}

    def ran(name: str) -> None:
        runs[name] = runs.get(name, 0) + 1

    @app.route("/t/read", methods=["GET", "POST"])
    def read() -> str:
        ran("read")
        db.execute(text("SELECT count(*) FROM repository"))
        db.execute(text(VICTIM))
        return "read"

    @app.get("/t/wrote-uncommitted")
    def wrote_uncommitted() -> str:  # a GET with a side write (last seen), lost with its connection
        ran("wrote-uncommitted")
        db.execute(text("INSERT INTO note VALUES ('uncommitted')"))
        db.execute(text(VICTIM))
        db.commit()
        return "ok"

    @app.post("/t/write")
    def write() -> str:
        ran("write")
        db.execute(text("INSERT INTO note VALUES ('post')"))
        db.execute(text(VICTIM))
        db.commit()
        return "saved"

    @app.get("/t/committed")
    def committed() -> str:
        ran("committed")
        db.execute(text("INSERT INTO note VALUES ('committed')"))
        db.commit()
        db.execute(text(VICTIM))
        return "ok"

    @app.get("/t/opted-out")
    @no_retry
    def opted_out() -> str:
        ran("opted-out")
        db.execute(text(VICTIM))
        return "ok"

    @app.get("/t/stream")
    def stream() -> flask.Response:
        ran("stream")

        def body() -> Iterator[str]:
            yield "first line\n"
            db.execute(text(VICTIM))
            yield "second line\n"

        return flask.Response(flask.stream_with_context(body()))

    return app, runs


@pytest.fixture
def apps() -> Iterator[Any]:
    made: list[flask.Flask] = []

    def make(url: str, **config: Any) -> tuple[flask.Flask, dict[str, int]]:
        app, runs = build(url, **config)
        made.append(app)
        return app, runs

    yield make
    for app in made:
        app.extensions["gitsrht.db"].get_bind().dispose()


def request_under_kill(app: flask.Flask, admin_dsn: str, method: str, path: str, **kwargs: Any) -> Any:
    killer = Killer(admin_dsn)
    killer.start()
    try:
        response = app.test_client().open(path, method=method, **kwargs)
    finally:
        killer.stop.set()
        killer.join(5)
    assert killer.killed == 1, "the victim query was never seen running"
    return response


def notes(admin_dsn: str, url: str) -> list[str]:
    dbname = url.rsplit("/", 1)[1]
    return [v for (v,) in sql.query(admin_dsn.replace("dbname=postgres", f"dbname={dbname}"),
                                    "SELECT v FROM note ORDER BY v")]


def test_a_get_that_lost_its_connection_is_rerun_and_answered_200(retry_db, apps, caplog):
    url, admin = retry_db
    app, runs = apps(url)
    caplog.set_level("INFO", logger="srht_readonly.flask")
    response = request_under_kill(app, admin, "GET", "/t/read")
    assert response.status_code == 200 and response.text == "read"
    assert runs == {"read": 2}
    assert any("re-running GET /t/read after a lost database connection" in r.getMessage() for r in caplog.records)


def test_without_a_budget_the_same_get_fails_with_the_unavailable_503(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url, SRHT_READONLY_RETRY_BUDGET=0)
    response = request_under_kill(app, admin, "GET", "/t/read", headers={"Accept": "application/json"})
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.get_json()["errors"][0]["extensions"]["code"] == "DATABASE_UNAVAILABLE"
    assert runs == {"read": 1}


def test_a_post_that_has_only_read_is_rerun(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    response = request_under_kill(app, admin, "POST", "/t/read", data={"q": "x"})
    assert response.status_code == 200 and runs == {"read": 2}


def test_a_get_whose_write_died_with_its_connection_is_rerun_and_writes_once(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    response = request_under_kill(app, admin, "GET", "/t/wrote-uncommitted")
    assert response.status_code == 200 and runs == {"wrote-uncommitted": 2}
    assert notes(admin, url).count("uncommitted") == 1  # the first attempt's INSERT was rolled back


def test_a_post_that_already_wrote_is_never_rerun(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    response = request_under_kill(app, admin, "POST", "/t/write", json={})
    assert response.status_code == 503
    assert response.get_json()["errors"][0]["extensions"]["code"] == "DATABASE_UNAVAILABLE"
    assert runs == {"write": 1}
    assert "post" not in notes(admin, url)


def test_a_get_that_committed_a_write_is_never_rerun(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    response = request_under_kill(app, admin, "GET", "/t/committed")
    assert response.status_code == 503 and runs == {"committed": 1}
    assert notes(admin, url).count("committed") == 1


def test_a_view_that_opted_out_is_never_rerun(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    response = request_under_kill(app, admin, "GET", "/t/opted-out")
    assert response.status_code == 503 and runs == {"opted-out": 1}


def test_a_streamed_response_is_never_rerun(retry_db, apps):
    url, admin = retry_db
    app, runs = apps(url)
    killer = Killer(admin)
    killer.start()
    try:
        client = app.test_client()
        with pytest.raises(Exception, match="terminat|server closed|crashed|connection"):
            client.get("/t/stream").get_data()  # the body fails half-way: the headers were sent
    finally:
        killer.stop.set()
        killer.join(5)
    assert killer.killed == 1 and runs == {"stream": 1}


def test_a_database_away_beyond_the_budget_gets_the_503_after_about_the_budget(apps):
    app, runs = apps(f"postgresql://srht@127.0.0.1:{free_port()}/nowhere", SRHT_READONLY_RETRY_BUDGET=0.6)
    started = time.monotonic()
    response = app.test_client().get("/t/read", headers={"Accept": "application/json"})
    took = time.monotonic() - started
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert response.get_json()["errors"][0]["extensions"]["code"] == "DATABASE_UNAVAILABLE"
    assert runs["read"] >= 3, runs  # 50 ms, 100 ms, 200 ms... jittered, within the budget
    assert 0.6 * 0.85 - 0.05 <= took < 0.6 + 1.0, took

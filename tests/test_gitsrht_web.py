"""The git.sr.ht web stand-in with srht_readonly.flask, on real servers, through PgBouncer.

"Read-only" here is the plan's read-only failover: the lab's PgBouncer pointed at the hot
standby. Each test builds a new app (so a new monitor, assuming writable), as a freshly
started service would be.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flask
import psycopg2.extensions
import pytest
from sqlalchemy import create_engine, insert

from integrations.gitsrht import schema
from integrations.gitsrht.web import create_app, init_db
from srht_readonly import Failure
from srht_readonly.flask import HEADER
from srht_readonly.ops import sql
from srht_readonly.ops.ports import free_port
from tests._db import bouncer_on_standby

RECHECK = 0.3


@dataclass(frozen=True)
class WebDatabase:
    name: str
    via_bouncer: str  # what the app is given, as in production
    primary_dsn: str  # for the test's own checks, whichever way PgBouncer points


@pytest.fixture(scope="module")
def web_db(srht_lab: Any) -> Iterator[WebDatabase]:
    """A database of our own on the shared lab (other tests use ``srht``), with the schema."""
    primary = srht_lab.primary
    name = f"gitsrht_web_{uuid.uuid4().hex[:8]}"
    sql.execute(primary.admin_dsn, f'CREATE DATABASE "{name}" OWNER srht')
    try:
        engine = create_engine(f"postgresql://srht@127.0.0.1:{primary.port}/{name}")
        init_db(engine, "alice")
        engine.dispose()
        yield WebDatabase(
            name, f"postgresql://srht@127.0.0.1:{srht_lab.pgbouncer.port}/{name}",
            primary.dsn_for(dbname=name),
        )
    finally:
        sql.execute(srht_lab.primary.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def apps() -> Iterator[Any]:
    """Make stand-in apps; their engines are disposed after the test."""
    made: list[flask.Flask] = []

    def make(url: str, **config: Any) -> flask.Flask:
        options = config.pop("engine_options", None)
        app = create_app(url, config={"TESTING": True, "SRHT_READONLY_RECHECK": RECHECK, **config},
                         engine_options=options)
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["gitsrht.db"].get_bind().dispose()


@pytest.fixture
def on_standby(srht_lab: Any, web_db: WebDatabase) -> Iterator[None]:
    with bouncer_on_standby(srht_lab):
        yield


def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return sql.query(dsn, query, params)


def repo_named(db: WebDatabase, name: str) -> list[tuple[Any, ...]]:
    return rows(db.primary_dsn, "SELECT description, visibility FROM repository WHERE name = %s", (name,))


def last_seen(db: WebDatabase) -> Any:
    return rows(db.primary_dsn, "SELECT last_seen FROM \"user\" WHERE username = 'alice'")[0][0]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_pages_work_and_record_last_seen_while_writable(web_db, apps):
    app = apps(web_db.via_bouncer)
    client = app.test_client()
    name = unique("healthy")
    response = client.post("/create", data={"name": name, "description": "first", "visibility": "public"})
    assert response.status_code == 302 and response.location == f"/~alice/{name}/"
    assert repo_named(web_db, name) == [("first", "public")]
    response = client.post(f"/~alice/{name}/settings", data={"description": "second", "visibility": "unlisted"})
    assert response.status_code == 302
    assert repo_named(web_db, name) == [("second", "unlisted")]
    before = last_seen(web_db)
    for path in ("/", f"/~alice/{name}/"):
        response = client.get(path)
        assert response.status_code == 200 and HEADER not in response.headers
        assert 'id="read-only-banner"' not in response.text
    assert last_seen(web_db) is not None and last_seen(web_db) != before
    api = client.post("/api/repos", json={"name": unique("api"), "visibility": "private"})
    assert api.status_code == 201 and api.get_json()["visibility"] == "private"


def test_on_the_standby_get_pages_work_with_header_and_banner_and_last_seen_is_dropped(web_db, apps, on_standby):
    name = unique("browse")
    app = apps(web_db.via_bouncer)
    seen = last_seen(web_db)
    client = app.test_client()
    response = client.get("/")  # the first request after the failover: its last-seen write fails
    assert response.status_code == 200
    assert response.headers[HEADER] == "true"
    assert 'id="read-only-banner"' in response.text and "read-only mode" in response.text
    state = app.extensions["srht_readonly"].monitor.state  # turned read-only by the dropped UPDATE
    assert state.reason == "error" and "cannot execute UPDATE" in state.detail
    assert client.get("/~alice/nonexistent/").status_code == 404
    assert client.post("/search", data={"q": name}).status_code == 200  # exempt: it only reads
    assert last_seen(web_db) == seen


def test_on_the_standby_a_form_post_gets_the_503_page_and_the_session_is_rolled_back(web_db, apps, on_standby):
    app = apps(web_db.via_bouncer, SRHT_READONLY_RETRY_AFTER=17)
    db = app.extensions["gitsrht.db"]
    in_transaction: list[bool] = []

    @app.teardown_request
    def record(exc: BaseException | None) -> None:  # runs before the app's own db.remove()
        in_transaction.append(db().in_transaction())

    name = unique("refused")
    response = app.test_client().post("/create", data={"name": name, "description": "d", "visibility": "public"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "17"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers[HEADER] == "true"
    page = " ".join(response.text.split())
    assert "git.sr.ht is in read-only mode" in page and "Nothing was saved" in page
    assert f'<input type="hidden" name="name" value="{name}">' in page
    assert in_transaction == [False]
    assert repo_named(web_db, name) == []
    assert app.extensions["srht_readonly"].monitor.state.reason == "error"


def test_on_the_standby_a_json_post_gets_the_json_error(web_db, apps, on_standby):
    client = apps(web_db.via_bouncer).test_client()
    name = unique("json")
    response = client.post("/api/repos", json={"name": name})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30" and response.headers[HEADER] == "true"
    errors = response.get_json()["errors"]
    assert len(errors) == 1 and errors[0]["extensions"] == {"code": "READ_ONLY"}
    assert "read-only mode" in errors[0]["message"]
    assert repo_named(web_db, name) == []


def test_after_the_first_failure_the_next_post_never_reaches_the_view(web_db, apps, on_standby, tmp_path: Path):
    app = apps(web_db.via_bouncer)
    db = app.extensions["gitsrht.db"]
    spool = tmp_path / "spool"

    @app.post("/import")
    def import_repo() -> str:  # work on disk first, then the database (as an import would)
        with spool.open("a") as out:
            out.write(flask.request.form["name"] + "\n")
        db.execute(insert(schema.repository).values(owner_id=1, name=flask.request.form["name"], path="/tmp/x"))
        db.commit()
        return "imported"

    client = app.test_client()
    first = client.post("/import", data={"name": unique("first")})
    assert first.status_code == 503
    assert len(spool.read_text().splitlines()) == 1  # the view ran, and failed at the database
    for _ in range(3):
        again = client.post("/import", data={"name": unique("again")})
        assert again.status_code == 503 and again.headers[HEADER] == "true"
    assert len(spool.read_text().splitlines()) == 1  # refused before the view: nothing on disk
    assert client.post("/search", data={"q": "x"}).status_code == 200  # exempt views still run


def test_an_unreachable_database_gets_the_unavailable_503_and_no_read_only_header(apps):
    app = apps(f"postgresql://srht@127.0.0.1:{free_port()}/srht")  # nothing listens there
    monitor = app.extensions["srht_readonly"].monitor
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 503 and "cannot reach its database" in page.text
    assert HEADER not in page.headers
    assert monitor.read_only and monitor.state.failure is Failure.UNAVAILABLE
    again = client.get("/", headers={"Accept": "application/json"})
    assert again.status_code == 503 and HEADER not in again.headers
    assert again.get_json()["errors"][0]["extensions"] == {"code": "DATABASE_UNAVAILABLE"}
    refused = client.post("/create", data={"name": unique("down"), "visibility": "public"})
    assert refused.status_code == 503 and HEADER not in refused.headers


def test_a_view_may_word_its_own_refusal(web_db, apps, srht_lab):
    name = unique("settings")
    sql.execute(web_db.primary_dsn, "INSERT INTO repository (owner_id, name, path) "
                "SELECT id, %s, '/tmp/x' FROM \"user\" WHERE username = 'alice'", (name,))
    with bouncer_on_standby(srht_lab):
        client = apps(web_db.via_bouncer).test_client()
        response = client.post(f"/~alice/{name}/settings", data={"description": "x", "visibility": "public"})
        assert response.status_code == 503
        assert f"The settings of alice/{name} cannot be changed while git.sr.ht is read-only." in response.text
        assert client.get(f"/~alice/{name}/settings").status_code == 200


class CountingCursor(psycopg2.extensions.cursor):
    """Every statement any connection of the engine runs, the monitor's raw probe included."""

    statements: list[str] = []

    def execute(self, query: Any, vars: Any = None) -> Any:
        CountingCursor.statements.append(query if isinstance(query, str) else query.decode())
        return super().execute(query, vars)


def test_healthy_requests_run_no_probe_query_and_a_read_only_monitor_does(web_db, apps, srht_lab):
    CountingCursor.statements = []
    app = apps(web_db.via_bouncer, engine_options={"connect_args": {"cursor_factory": CountingCursor}})
    client = app.test_client()
    name = unique("count")
    assert client.post("/create", data={"name": name, "visibility": "public"}).status_code == 302
    for _ in range(20):
        assert client.get("/").status_code == 200
        assert client.get(f"/~alice/{name}/").status_code == 200
    assert CountingCursor.statements, "the counter saw nothing"
    assert not [s for s in CountingCursor.statements if "pg_is_in_recovery" in s]
    # The counter does see probes: once read-only, the monitor probes every RECHECK seconds.
    with bouncer_on_standby(srht_lab):
        assert client.post("/create", data={"name": unique("x"), "visibility": "public"}).status_code == 503
        time.sleep(RECHECK * 1.5)
        assert client.get("/").headers[HEADER] == "true"
    assert [s for s in CountingCursor.statements if "pg_is_in_recovery" in s]


def test_back_to_writable_by_itself_after_promotion_without_restart(srht_fresh_lab, apps, capsys):
    lab = srht_fresh_lab
    engine = create_engine(lab.primary.url)
    init_db(engine, "alice")
    engine.dispose()
    lab.wait_caught_up(timeout=10)
    standby = lab.standby
    lab.pgbouncer.point_at(standby)
    app = apps(lab.pgbouncer.url)
    monitor = app.extensions["srht_readonly"].monitor
    client = app.test_client()
    form = {"name": "after-promotion", "description": "saved once writable", "visibility": "public"}
    assert client.post("/create", data=form).status_code == 503
    assert client.post("/create", data=form).status_code == 503  # refused before the view
    promotion = lab.promote(standby)  # PgBouncer already points at it: no restart, no repoint
    promoted = time.monotonic()
    while client.get("/").headers.get(HEADER) == "true":
        assert time.monotonic() - promoted < RECHECK + 5, "the monitor did not notice the promotion"
        time.sleep(0.02)
    noticed = time.monotonic() - promoted
    assert not monitor.read_only and monitor.state.reason == "probe"
    response = client.post("/create", data=form)
    assert response.status_code == 302, response.text
    assert rows(standby.dsn, "SELECT description FROM repository WHERE name = 'after-promotion'") == [
        ("saved once writable",)
    ]
    with capsys.disabled():
        print(f"\n[web] promotion took {promotion.seconds:.2f} s; the app took writes again {noticed:.2f} s "
              f"after it (monitor recheck {RECHECK} s, no restart)")
    assert noticed <= RECHECK + 1.5

"""srht_readonly.flask without a database: registration, config, negotiation, templates, banner.

The monitor is told by hand (``set_read_only``) so these run in milliseconds; the same promises
against real servers (PgBouncer pointed at a hot standby) are in test_gitsrht_web.py.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import flask
import pytest
from sqlalchemy.exc import InternalError, OperationalError, ProgrammingError

from srht_readonly import DatabaseUnavailable, Failure, ReadOnlyError, ReadOnlyMonitor
from srht_readonly.flask import DEFAULT_TEMPLATE, DEFAULTS, EXTENSION_KEY, HEADER, ReadOnly, exempt
from srht_readonly.monitor import Announcement
from tests._fakes import Pg2Error, UnboundSession

FakeSession = UnboundSession


def make_app(tmp_path: Path | None = None, **config: Any) -> tuple[flask.Flask, ReadOnlyMonitor, FakeSession]:
    app = flask.Flask(__name__, template_folder=str(tmp_path) if tmp_path else None)
    app.config.update(TESTING=True, **config)
    monitor = ReadOnlyMonitor(recheck=600, announce_file=config.get("SRHT_READONLY_ANNOUNCE_FILE"))
    session = FakeSession()
    ReadOnly(app, monitor=monitor, session=session)
    app.ran = []  # type: ignore[attr-defined]

    @app.route("/", methods=["GET", "POST"])
    def index() -> str:
        app.ran.append(flask.request.method)  # type: ignore[attr-defined]
        return flask.render_template_string("<p id=banner>{{ read_only_banner or '' }}</p>")

    @app.post("/search")
    @exempt
    def search() -> str:
        app.ran.append("search")  # type: ignore[attr-defined]
        return "results"

    @app.post("/raise/<kind>")
    def raise_(kind: str) -> str:
        if kind == "read-only":
            raise InternalError("INSERT ...", {}, Pg2Error("cannot execute INSERT in a read-only transaction", "25006"))
        if kind == "custom":
            raise ReadOnlyError("Tickets cannot be filed right now.")
        if kind == "unknown":
            raise DatabaseUnavailable("lost during commit", failure=Failure.COMMIT_UNKNOWN)
        if kind == "down":
            raise DatabaseUnavailable("database went away", failure=Failure.UNAVAILABLE)
        raise ProgrammingError("SELECT nope", {}, Pg2Error('relation "nope" does not exist', "42P01"))

    return app, monitor, session


def test_init_app_registers_state_and_sets_every_documented_key_once():
    app = flask.Flask(__name__)
    app.config["SRHT_READONLY_RETRY_AFTER"] = 120
    monitor = ReadOnlyMonitor(announce_file=None)
    extension = ReadOnly(monitor=monitor)
    state = extension.init_app(app)
    assert app.extensions[EXTENSION_KEY] is state
    assert state.monitor is monitor and state.extension is extension
    for key, default in DEFAULTS.items():
        expected = 120 if key == "RETRY_AFTER" else default
        assert app.config[f"SRHT_READONLY_{key}"] == expected
    assert state.settings.retry_after == 120
    app.config["SRHT_READONLY_RETRY_AFTER"] = 5  # read once: later changes are not seen
    assert state.settings.retry_after == 120


def test_init_app_refuses_a_second_registration():
    app = flask.Flask(__name__)
    ReadOnly(app, monitor=ReadOnlyMonitor(announce_file=None))
    with pytest.raises(RuntimeError, match="already registered"):
        ReadOnly(app, monitor=ReadOnlyMonitor(announce_file=None))


def test_bad_config_is_refused_naming_the_key():
    app = flask.Flask(__name__)
    app.config["SRHT_READONLY_RETRY_AFTER"] = "soon"
    with pytest.raises(ValueError, match="SRHT_READONLY_RETRY_AFTER"):
        ReadOnly(app, monitor=ReadOnlyMonitor(announce_file=None))


def test_extension_makes_a_monitor_per_app_with_the_configured_recheck():
    extension = ReadOnly()
    first, second = flask.Flask("first"), flask.Flask("second")
    first.config["SRHT_READONLY_RECHECK"] = 0.5
    extension.init_app(first)
    extension.init_app(second)
    assert first.extensions[EXTENSION_KEY].monitor.recheck == 0.5
    assert second.extensions[EXTENSION_KEY].monitor.recheck == DEFAULTS["RECHECK"]
    assert extension.monitor is second.extensions[EXTENSION_KEY].monitor


def test_healthy_requests_pass_untouched():
    app, _, session = make_app()
    client = app.test_client()
    for method in (client.get, client.post):
        response = method("/")
        assert response.status_code == 200
        assert HEADER not in response.headers
        assert '<p id=banner></p>' in response.text
    assert app.ran == ["GET", "POST"]  # type: ignore[attr-defined]
    assert session.rollbacks == 0


def test_while_read_only_a_form_post_is_refused_before_the_view_with_the_503_page():
    app, monitor, session = make_app(SRHT_READONLY_RETRY_AFTER=45, SRHT_READONLY_STATUS_URL="https://status.sr.ht")
    monitor.set_read_only("test")
    response = app.test_client().post("/?tab=1", data={"name": "hello", "note": '<script>"x"</script>'})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "45"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers[HEADER] == "true"
    assert response.mimetype == "text/html"
    assert app.ran == []  # type: ignore[attr-defined]
    assert session.rollbacks == 1
    page = response.text
    assert "is in read-only mode" in page and "Nothing was saved" in page
    assert "refreshing this page" in page and 'href="https://status.sr.ht"' in page
    # The retry control re-posts the same fields, escaped, to the same URL.
    assert '<form method="post" action="/?tab=1">' in page
    assert '<input type="hidden" name="name" value="hello">' in page
    assert "&lt;script&gt;&#34;x&#34;&lt;/script&gt;" in page and "<script>" not in page


@pytest.mark.parametrize("secret", ["password", "new_password", "passwd", "client_secret", "token", "api_key",
                                    "passphrase", "otp"])
def test_the_retry_form_never_holds_a_password_like_field(secret: str):
    app, monitor, _ = make_app()
    monitor.set_read_only("test")
    response = app.test_client().post("/", data={"username": "alice", secret: "hunter2",
                                                       "csrf_token": "abc"})
    page = response.text
    assert "hunter2" not in page
    assert '<input type="hidden" name="username" value="alice">' in page
    assert '<input type="hidden" name="csrf_token" value="abc">' in page  # not a secret, and the form needs it
    assert f"Fields such as {secret} are not repeated" in page


@pytest.mark.parametrize("how", ["content-type", "accept", "api-prefix", "graphql"])
def test_api_and_graphql_clients_get_the_json_error(how: str):
    app, monitor, _ = make_app()
    app.add_url_rule("/api/repos", "api", lambda: "created", methods=["POST"])
    app.add_url_rule("/query", "query", lambda: "{}", methods=["POST"])
    monitor.set_read_only("test")
    client = app.test_client()
    response = {
        "content-type": lambda: client.post("/", json={"name": "x"}),
        "accept": lambda: client.post("/", data={"name": "x"}, headers={"Accept": "application/json"}),
        "api-prefix": lambda: client.post("/api/repos", data={"name": "x"}),
        "graphql": lambda: client.post("/query", data='{"query": "mutation"}'),
    }[how]()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == str(DEFAULTS["RETRY_AFTER"])
    error = response.get_json()["errors"][0]
    assert error["extensions"] == {"code": "READ_ONLY"}
    assert "read-only mode" in error["message"]


def test_browsers_get_html_even_with_a_generic_accept():
    app, monitor, _ = make_app()
    monitor.set_read_only("test")
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    for headers in ({"Accept": accept}, {"Accept": "*/*"}, {}):
        assert app.test_client().post("/", data={}, headers=headers).mimetype == "text/html"


def test_while_read_only_gets_work_with_the_header_and_the_banner():
    app, monitor, _ = make_app(SRHT_READONLY_BANNER="Read-only for maintenance.")
    monitor.set_read_only("test")
    response = app.test_client().get("/")
    assert response.status_code == 200
    assert response.headers[HEADER] == "true"
    assert "<p id=banner>Read-only for maintenance.</p>" in response.text


def test_exempt_views_run_while_read_only():
    app, monitor, _ = make_app()
    monitor.set_read_only("test")
    response = app.test_client().post("/search", data={"q": "x"})
    assert response.status_code == 200 and response.text == "results"
    assert response.headers[HEADER] == "true"
    assert app.ran == ["search"]  # type: ignore[attr-defined]


def test_unknown_urls_stay_404_while_read_only():
    app, monitor, _ = make_app()
    monitor.set_read_only("test")
    assert app.test_client().post("/nowhere").status_code == 404


def test_refusal_comes_before_the_apps_own_before_request_functions():
    app = flask.Flask(__name__)
    seen: list[str] = []
    app.before_request(lambda: seen.append("app's before_request") and None)
    monitor = ReadOnlyMonitor(recheck=600, announce_file=None)
    ReadOnly(app, monitor=monitor)
    app.add_url_rule("/", "index", lambda: "ok", methods=["POST"])
    monitor.set_read_only("test")
    assert app.test_client().post("/").status_code == 503
    assert seen == []


def test_a_read_only_database_error_in_the_view_becomes_the_503_and_turns_the_monitor():
    app, monitor, session = make_app()
    client = app.test_client()
    response = client.post("/raise/read-only", data={"x": "1"})
    assert response.status_code == 503
    assert response.headers[HEADER] == "true"
    assert session.rollbacks == 1
    assert monitor.state.read_only and monitor.state.reason == "error"


def test_a_views_own_read_only_message_is_shown():
    app, _, _ = make_app()
    response = app.test_client().post("/raise/custom", json={})
    assert response.status_code == 503
    assert response.get_json()["errors"][0] == {
        "message": "Tickets cannot be filed right now.", "extensions": {"code": "READ_ONLY"},
    }


def test_an_unknown_commit_outcome_does_not_claim_nothing_was_saved():
    app, _, _ = make_app()
    response = app.test_client().post("/raise/unknown", data={})
    assert response.status_code == 503
    page = " ".join(response.text.split())
    assert "lost during commit" in page and "It may have been saved or not" in page
    assert "Nothing was saved" not in page
    assert app.test_client().post("/raise/unknown", json={}).get_json()["errors"][0]["extensions"] == {
        "code": "COMMIT_UNKNOWN"
    }


def test_an_unreachable_database_gets_a_503_unavailable():
    app, _, _ = make_app()
    response = app.test_client().post("/raise/down", json={})
    assert response.status_code == 503
    assert response.get_json()["errors"][0]["extensions"] == {"code": "DATABASE_UNAVAILABLE"}


def test_the_header_is_left_off_while_the_database_is_unreachable_and_back_once_it_is_read_only():
    answers: list[bool | Exception] = [Pg2Error('connection to server at "127.0.0.1", port 1 failed: '
                                                "Connection refused", None)]

    def probe() -> bool:
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise answer
        return answer

    app = flask.Flask(__name__)
    app.config["TESTING"] = True
    monitor = ReadOnlyMonitor(recheck=600, probe=probe, announce_file=None)
    ReadOnly(app, monitor=monitor, session=FakeSession())
    app.add_url_rule("/", "index", lambda: "page", methods=["GET", "POST"])

    @app.get("/down")
    def down() -> str:
        raise DatabaseUnavailable("database went away", failure=Failure.UNAVAILABLE)

    app.add_url_rule("/banner", "banner", lambda: flask.render_template_string("{{ read_only_banner or '' }}"))
    client = app.test_client()
    response = client.get("/down", headers={"Accept": "application/json"})
    assert response.status_code == 503
    assert response.get_json()["errors"][0]["extensions"] == {"code": "DATABASE_UNAVAILABLE"}
    # The after-request hook read the monitor, which probed and found the database unreachable.
    assert monitor.state.read_only and monitor.state.failure is Failure.UNAVAILABLE
    assert HEADER not in response.headers
    assert HEADER not in client.get("/").headers
    refused = client.post("/", data={})
    assert refused.status_code == 503 and "cannot reach its database" in refused.text
    assert HEADER not in refused.headers
    assert "cannot reach its database" in client.get("/banner").text  # not "maintenance"
    answers.append(True)  # it answers again, as a hot standby: read-only now
    assert monitor.check() is True and monitor.state.failure is None
    assert client.get("/").headers[HEADER] == "true"
    refused = client.post("/", data={})
    assert refused.status_code == 503 and "is in read-only mode" in refused.text
    assert refused.headers[HEADER] == "true"
    assert "read-only mode for database maintenance" in client.get("/banner").text


def test_other_database_errors_stay_500s():
    app, monitor, session = make_app()
    app.config["PROPAGATE_EXCEPTIONS"] = False
    response = app.test_client().post("/raise/syntax")
    assert response.status_code == 500
    assert HEADER not in response.headers
    assert not monitor.state.read_only
    assert session.rollbacks == 0


def test_the_service_overrides_the_page_from_its_own_templates(tmp_path: Path):
    (tmp_path / "srht_readonly").mkdir()
    (tmp_path / DEFAULT_TEMPLATE).write_text("<h1>Ours: {{ message }} {{ retry.method }} {{ site_name }}</h1>")
    app, monitor, _ = make_app(tmp_path, SRHT_READONLY_SITE_NAME="todo.sr.ht")
    monitor.set_read_only("test")
    response = app.test_client().post("/")
    assert response.status_code == 503
    assert response.text.startswith("<h1>Ours: todo.sr.ht is in read-only mode")
    assert response.text.endswith("POST todo.sr.ht</h1>")


def test_the_template_name_is_configurable(tmp_path: Path):
    (tmp_path / "maintenance.html").write_text("maintenance {{ failure }}")
    app, monitor, _ = make_app(tmp_path, SRHT_READONLY_TEMPLATE="maintenance.html")
    monitor.set_read_only("test")
    assert app.test_client().post("/").text == "maintenance read_only"


def test_the_banner_shows_the_operators_announcement(tmp_path: Path):
    announce = tmp_path / "announce"
    soon = datetime.now(UTC) + timedelta(hours=1)
    Announcement("Read-only maintenance at 10:00 UTC.", starts=soon, ends=soon + timedelta(hours=1)).write(announce)
    app, monitor, _ = make_app(SRHT_READONLY_ANNOUNCE_FILE=str(announce))
    client = app.test_client()
    response = client.get("/")  # announced ahead: shown, but the database still takes writes
    assert "<p id=banner>Read-only maintenance at 10:00 UTC.</p>" in response.text
    assert HEADER not in response.headers
    assert client.post("/").status_code == 200
    Announcement("Read-only now, back by 11:00 UTC.").write(announce)
    assert monitor.check() is True
    response = client.post("/", data={"a": "b"})
    assert response.status_code == 503
    assert "Maintenance notice:</strong> Read-only now, back by 11:00 UTC." in response.text


def test_importing_the_package_does_not_import_flask():
    code = "import sys, srht_readonly; assert 'flask' not in sys.modules, 'flask imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_sessions_engine_is_instrumented_and_a_second_monitor_is_refused():
    from sqlalchemy import create_engine
    from sqlalchemy.orm import scoped_session, sessionmaker

    from srht_readonly.sqlalchemy import is_instrumented

    engine = create_engine("postgresql+psycopg2://srht@127.0.0.1:1/srht")  # never connected
    db = scoped_session(sessionmaker(bind=engine))
    extension = ReadOnly(flask.Flask("first"), session=db)
    assert is_instrumented(engine) and extension.monitor.engine is engine
    ReadOnly(flask.Flask("same"), monitor=extension.monitor, session=db)  # the same monitor: fine
    with pytest.raises(ValueError, match="pass that one"):
        ReadOnly(flask.Flask("second"), session=db)
    assert db.registry.has() is False  # no session was made just to find the engine
    engine.dispose()


@pytest.mark.parametrize(("key", "value"), [("RETRY_BUDGET", -1), ("RETRY_BUDGET", "soon"), ("SHARED_TTL", 0)])
def test_bad_retry_and_shared_state_settings_are_refused_naming_the_key(key: str, value: Any):
    app = flask.Flask(__name__)
    app.config[f"SRHT_READONLY_{key}"] = value
    with pytest.raises(ValueError, match=f"SRHT_READONLY_{key}"):
        ReadOnly(app, monitor=ReadOnlyMonitor(announce_file=None))


def test_without_an_engine_to_watch_nothing_is_rerun():
    # Nothing records what the request wrote, so a lost connection is answered at once (the
    # re-run itself, on real servers, is tests/test_flask_retry.py).
    app, _, _ = make_app()
    runs = []

    @app.get("/lost")
    def lost() -> str:
        runs.append(1)
        raise OperationalError("SELECT 1", {}, Pg2Error("server closed the connection unexpectedly"))

    response = app.test_client().get("/lost", headers={"Accept": "application/json"})
    assert response.status_code == 503 and runs == [1]
    assert response.get_json()["errors"][0]["extensions"] == {"code": "DATABASE_UNAVAILABLE"}

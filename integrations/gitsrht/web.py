"""git.sr.ht's web front, as far as a failover drill needs it, written as an sr.ht service is.

``create_app(database_url)`` builds the Flask app: a ``scoped_session`` over an engine (as
core.sr.ht does; made by ``srht_readonly.sqlalchemy.create_engine``, so a bare ``postgresql://``
is psycopg2 behind PgBouncer), the ``srht_readonly.flask.ReadOnly`` extension on top,
and the pages a user touches: the repository list (``/``), creating one (``/create``), a
repository's page and its settings (``/~owner/name``, ``/~owner/name/settings``), a search form
that POSTs without writing (exempt), and a small JSON API (``/api/repos``).

Incidental writes follow the plan: the list and repository pages record the user's
"last seen" time, and that write is *dropped* (``drop_on_read_only``) while the database is
read-only, so the pages keep working; its COMMIT, the page's last database work, is dropped too
when the connection is lost under it (the page was read by then, and the write may be lost).
Deliberate writes (create, settings) are left to the extension, which answers them with its
503 page.

Run it by hand::

    python -m integrations.gitsrht.web postgresql://srht@127.0.0.1:16432/srht --init
"""

from __future__ import annotations

import argparse
import contextlib
import re
import threading
from collections.abc import Iterator
from typing import Any

import flask
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import scoped_session, sessionmaker
from werkzeug.serving import make_server

from srht_readonly import Failure, abort_on_read_only, classify, drop_on_read_only
from srht_readonly.flask import ReadOnly, exempt
from srht_readonly.sqlalchemy import create_engine

from . import schema

__all__ = ["create_app", "init_db", "serve"]

VISIBILITIES = ("public", "unlisted", "private")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,256}$")


def init_db(engine: Engine, username: str = "alice") -> None:
    """Create the tables and the user (idempotent); run it against a writable database."""
    schema.create(engine)
    with engine.begin() as conn:
        exists = conn.execute(select(schema.user.c.id).where(schema.user.c.username == username)).first()
        if exists is None:
            conn.execute(insert(schema.user).values(username=username))


def create_app(
    database_url: str,
    *,
    config: dict[str, Any] | None = None,
    read_only: bool = True,
    engine_options: dict[str, Any] | None = None,
) -> flask.Flask:
    """The web front on ``database_url`` (through PgBouncer in production and in the tests).

    ``config`` overrides Flask and ``SRHT_READONLY_*`` keys; ``GITSRHT_USER`` is the signed-in
    user (default ``alice``), ``GITSRHT_REPOS`` the repositories' directory. ``read_only=False``
    builds the same app without the extension (the benchmark's baseline).
    """
    app = flask.Flask(__name__)
    app.config.update(
        SECRET_KEY="stand-in",
        GITSRHT_USER="alice",
        GITSRHT_REPOS="/var/lib/git",
        SRHT_READONLY_SITE_NAME="git.sr.ht",
    )
    app.config.update(config or {})
    engine = create_engine(database_url, **(engine_options or {}))
    db = scoped_session(sessionmaker(bind=engine))
    app.extensions["gitsrht.db"] = db

    @app.teardown_appcontext
    def remove_session(exc: BaseException | None) -> None:
        db.remove()

    if read_only:
        ReadOnly(app, session=db)
    app.register_blueprint(_views(db))
    return app


def _views(db: scoped_session[Any]) -> flask.Blueprint:
    bp = flask.Blueprint("git", __name__)
    repo_t, user_t = schema.repository, schema.user

    def current_user() -> Any:
        username = flask.current_app.config["GITSRHT_USER"]
        row = db.execute(select(user_t).where(user_t.c.username == username)).first()
        if row is None:
            flask.abort(403, f"unknown user {username}")
        return row

    def touch_last_seen(user_id: int) -> None:
        state = flask.current_app.extensions.get("srht_readonly")
        if state is not None and state.read_only:
            return  # known read-only: don't even try
        # The first request after a failover does try: the UPDATE fails, the savepoint is rolled
        # back and the page goes on reading. Without it the whole transaction would be aborted.
        with drop_on_read_only(db):
            db.execute(update(user_t).where(user_t.c.id == user_id).values(last_seen=func.now()))

    def commit_last_seen() -> None:
        """Commit the page's reads and its last-seen update, the page's last database work.

        A connection lost under this COMMIT leaves the update's fate unknown, which the plan
        allows for this write: the page (already read) is served all the same. Re-running the
        request is not allowed once a write reached COMMIT (docs/flask.md#transparent-retry).
        """
        try:
            db.commit()
        except DBAPIError as exc:
            if classify(exc) not in (Failure.UNAVAILABLE, Failure.COMMIT_UNKNOWN):
                raise
            with contextlib.suppress(Exception):
                db.rollback()

    def find_repo(owner: str, name: str) -> Any:
        row = db.execute(
            select(repo_t, user_t.c.username.label("owner"))
            .join(user_t, user_t.c.id == repo_t.c.owner_id)
            .where(user_t.c.username == owner, repo_t.c.name == name)
        ).first()
        if row is None:
            flask.abort(404)
        return row

    def repos_of(user_id: int, query: str | None = None) -> list[Any]:
        stmt = select(repo_t).where(repo_t.c.owner_id == user_id).order_by(repo_t.c.updated.desc())
        if query:
            stmt = stmt.where(repo_t.c.name.contains(query, autoescape=True))
        return list(db.execute(stmt))

    def validate(form: dict[str, str], *, creating: bool) -> list[str]:
        errors = []
        if creating and not _NAME.match(form.get("name", "")):
            errors.append("Name must be 1-256 letters, digits, dots, dashes or underscores.")
        if form.get("visibility", "public") not in VISIBILITIES:
            errors.append("Visibility must be public, unlisted or private.")
        return errors

    def insert_repo(user: Any, form: dict[str, str]) -> str | None:
        """Create the repository; the error to show, or None."""
        name = form["name"]
        if db.execute(select(repo_t.c.id).where(repo_t.c.owner_id == user.id, repo_t.c.name == name)).first():
            return f"You already have a repository called {name}."
        repos = flask.current_app.config["GITSRHT_REPOS"]
        db.execute(insert(repo_t).values(
            owner_id=user.id, name=name, description=form.get("description") or None,
            visibility=form.get("visibility", "public"), path=f"{repos}/~{user.username}/{name}",
        ))
        db.commit()
        return None

    @bp.get("/")
    def index() -> str:
        user = current_user()
        touch_last_seen(user.id)
        repos = repos_of(user.id)
        commit_last_seen()
        return flask.render_template("index.html", user=user, repos=repos, query="")

    @bp.post("/search")
    @exempt
    def search() -> str:
        user = current_user()
        query = flask.request.form.get("q", "").strip()
        return flask.render_template("index.html", user=user, repos=repos_of(user.id, query), query=query)

    @bp.route("/create", methods=["GET", "POST"])
    def create() -> Any:
        user = current_user()
        if flask.request.method == "GET":
            return flask.render_template("create.html", user=user, form={}, errors=[])
        form = flask.request.form.to_dict()
        errors = validate(form, creating=True)
        if not errors:
            error = insert_repo(user, form)
            if error is None:
                return flask.redirect(flask.url_for("git.summary", owner=user.username, name=form["name"]))
            errors = [error]
        return flask.render_template("create.html", user=user, form=form, errors=errors), 400

    @bp.get("/~<owner>/<name>/")
    def summary(owner: str, name: str) -> str:
        user = current_user()
        touch_last_seen(user.id)
        repo = find_repo(owner, name)
        commit_last_seen()
        return flask.render_template("repo.html", user=user, repo=repo)

    @bp.route("/~<owner>/<name>/settings", methods=["GET", "POST"])
    def settings(owner: str, name: str) -> Any:
        user = current_user()
        repo = find_repo(owner, name)
        if flask.request.method == "GET":
            return flask.render_template("settings.html", user=user, repo=repo, errors=[])
        form = flask.request.form.to_dict()
        errors = validate(form, creating=False)
        if errors:
            return flask.render_template("settings.html", user=user, repo=repo, errors=errors), 400
        # A view may word the refusal itself: abort_on_read_only turns the failure into a
        # ReadOnlyError with this message, which the extension shows on its page.
        with abort_on_read_only(f"The settings of {owner}/{name} cannot be changed while git.sr.ht is read-only."):
            db.execute(update(repo_t).where(repo_t.c.id == repo.id).values(
                description=form.get("description") or None,
                visibility=form.get("visibility", repo.visibility), updated=func.now(),
            ))
            db.commit()
        return flask.redirect(flask.url_for("git.summary", owner=owner, name=name))

    @bp.get("/api/repos")
    def api_list() -> Any:
        user = current_user()
        return {"results": [_repo_json(r, user.username) for r in repos_of(user.id)]}

    @bp.post("/api/repos")
    def api_create() -> Any:
        user = current_user()
        body = flask.request.get_json(silent=True) or {}
        form = {k: str(v) for k, v in body.items() if k in ("name", "description", "visibility")}
        errors = validate(form, creating=True)
        error = errors[0] if errors else insert_repo(user, form)
        if error is not None:
            return {"errors": [{"message": error}]}, 400
        return _repo_json(find_repo(user.username, form["name"]), user.username), 201

    return bp


def _repo_json(repo: Any, owner: str) -> dict[str, Any]:
    return {
        "name": repo.name, "owner": f"~{owner}", "description": repo.description,
        "visibility": repo.visibility, "updated": repo.updated.isoformat(),
    }


@contextlib.contextmanager
def serve(app: flask.Flask, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a real threaded HTTP server in a thread; yields its base URL."""
    server = make_server(host, port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name=f"gitsrht-web:{server.server_port}", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """``python -m integrations.gitsrht.web URL [--init] [--port N]``: run the stand-in by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--init", action="store_true", help="create the tables and the user first")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    app = create_app(args.database_url)
    if args.init:
        init_db(create_engine(args.database_url), app.config["GITSRHT_USER"])
    app.run(host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()

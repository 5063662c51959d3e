"""The git.sr.ht stand-in as the gunicorn tests serve it: the real app, naming its worker.

``create()`` is ``integrations.gitsrht.wsgi.app_from_env()`` (which, with ``GITSRHT_VIEW_LOG``,
logs every view run and every change of the monitor's mind: ``integrations.gitsrht.viewlog``),
plus one addition: every response names the worker that answered it (``X-Worker: pid``).
"""

from __future__ import annotations

import os

import flask

from integrations.gitsrht import viewlog
from integrations.gitsrht.wsgi import app_from_env

FACTORY = "tests._web_app:create()"


def view_runs(path: str) -> list[tuple[int, str, str]]:
    """The views the workers ran, in order: (pid, method, endpoint)."""
    return [(line.pid, line.what, line.detail) for line in viewlog.read(path) if line.kind == "view"]


def create() -> flask.Flask:
    app = app_from_env()

    @app.after_request
    def name_the_worker(response: flask.Response) -> flask.Response:
        response.headers["X-Worker"] = str(os.getpid())
        return response

    return app

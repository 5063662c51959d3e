"""The git.sr.ht stand-in as the gunicorn tests serve it: the real app, plus what the tests observe.

``create()`` is ``integrations.gitsrht.wsgi.app_from_env()`` with two additions:

* every run of a view appends a line ``pid method endpoint`` to ``GITSRHT_VIEW_LOG`` (one
  ``write`` with ``O_APPEND``, so the workers' lines never mix), so a test can tell a request
  refused before its view from one that reached it;
* every response names the worker that answered it (``X-Worker: pid``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flask

from integrations.gitsrht.wsgi import app_from_env

FACTORY = "tests._web_app:create()"


def view_runs(path: str) -> list[tuple[int, str, str]]:
    """The lines ``create()``'s app appended to ``path``: (pid, method, endpoint)."""
    try:
        with open(path) as f:
            return [(int(pid), method, endpoint) for pid, method, endpoint in (line.split() for line in f)]
    except FileNotFoundError:
        return []


def create() -> flask.Flask:
    app = app_from_env()
    log = os.environ["GITSRHT_VIEW_LOG"]

    def logged(view: Any, endpoint: str) -> Any:
        @functools.wraps(view)  # carries srht_readonly's marks (exempt, no_retry) along
        def run(*args: Any, **kwargs: Any) -> Any:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()} {flask.request.method} {endpoint}\n".encode())
            finally:
                os.close(fd)
            return view(*args, **kwargs)

        return run

    for endpoint, view in list(app.view_functions.items()):
        if endpoint != "static":
            app.view_functions[endpoint] = logged(view, endpoint)

    @app.after_request
    def name_the_worker(response: flask.Response) -> flask.Response:
        response.headers["X-Worker"] = str(os.getpid())
        return response

    return app

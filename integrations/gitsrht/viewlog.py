"""What each worker of the stand-in did, for whoever judges it afterwards (the drill, the tests).

``record(app, path)`` makes every process serving ``app`` append one line to ``path`` each time

* a view runs: ``<clock> <pid> view <METHOD> <endpoint>``; a request refused before its view
  (the read-only 503 from ``before_request``) writes nothing, so the lines tell the two apart;
* its read-only monitor changes its mind: ``<clock> <pid> state read-only|writable <failure>``
  (``-`` when there is no failure to name).

``<clock>`` is ``time.monotonic()``: on Linux one clock for every process of the machine, so the
drill compares it with its own record without converting. Each line is one ``write`` to a file
opened with ``O_APPEND``, so the lines of several workers never mix.

``read(path)`` parses the file back into :class:`Line` tuples.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import flask

__all__ = ["Line", "read", "record"]


class Line(NamedTuple):
    t: float
    pid: int
    kind: str  # "view" or "state"
    what: str  # the method, or "read-only"/"writable"
    detail: str  # the endpoint, or the failure ("-": none)


def read(path: str | os.PathLike[str]) -> list[Line]:
    """Every line ``record`` wrote to ``path`` (none if it does not exist)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        t, pid, kind, what, detail = raw.split(" ", 4)
        lines.append(Line(float(t), int(pid), kind, what, detail))
    return lines


def record(app: flask.Flask, path: str | os.PathLike[str]) -> None:
    """Log every view run of ``app``, and every change of its monitor's mind, to ``path``."""

    def append(kind: str, what: str, detail: str) -> None:
        line = f"{time.monotonic():.6f} {os.getpid()} {kind} {what} {detail}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def logged(view: Any, endpoint: str) -> Any:
        @functools.wraps(view)  # carries srht_readonly's marks (exempt, no_retry) along
        def run(*args: Any, **kwargs: Any) -> Any:
            append("view", flask.request.method, endpoint)
            return view(*args, **kwargs)

        return run

    for endpoint, view in list(app.view_functions.items()):
        if endpoint != "static":
            app.view_functions[endpoint] = logged(view, endpoint)

    state = app.extensions.get("srht_readonly")
    if state is not None:
        def on_change(event: Any) -> None:
            if event["event"] in ("read-only", "writable"):
                failure = event["failure"]
                append("state", event["event"], "-" if failure is None else failure.value)

        state.monitor.add_listener(on_change)

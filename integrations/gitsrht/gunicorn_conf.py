"""gunicorn settings for the git.sr.ht stand-in (``-c python:integrations.gitsrht.gunicorn_conf``).

Sync workers, as sr.ht runs its web fronts. When ``GITSRHT_READY_DIR`` is set, each worker
creates a file named after its pid there once it has loaded the app and removes it when it
exits: ``wsgi.Gunicorn`` waits for them before sending traffic.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

worker_class = "sync"
accesslog = None
loglevel = "info"
# gunicorn 24+ opens a control socket at one fixed path per user, which several servers on one
# machine (the tests, the drill) would fight over; older versions ignore the unknown name.
control_socket_disable = True


def _ready_file(worker: Any) -> Path | None:
    directory = os.environ.get("GITSRHT_READY_DIR")
    return Path(directory) / str(worker.pid) if directory else None


def post_worker_init(worker: Any) -> None:
    path = _ready_file(worker)
    if path is not None:
        path.touch()


def worker_exit(server: Any, worker: Any) -> None:
    path = _ready_file(worker)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def child_exit(server: Any, worker: Any) -> None:
    # prometheus_client's multi-process mode: a dead worker's live gauges must not count.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from srht_readonly.metrics import mark_process_dead

        mark_process_dead(worker.pid)

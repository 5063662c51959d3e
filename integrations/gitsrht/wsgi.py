"""git.sr.ht's web stand-in under gunicorn, as sr.ht serves its web fronts (several worker processes).

``app_from_env()`` is the app factory gunicorn calls in each worker; everything comes from the
environment:

* ``GITSRHT_DATABASE_URL`` (required): the database, through PgBouncer;
* ``GITSRHT_USER``, ``GITSRHT_REPOS``: as ``create_app``'s config;
* ``GITSRHT_READ_ONLY=0``: the app without srht_readonly (the drill's ``web-500`` sabotage);
* ``GITSRHT_POOL_SIZE``: the engine's ``pool_size`` (``max_overflow`` as much again);
* ``GITSRHT_LOG_LEVEL``: the level of the app's own logs on stderr (default ``INFO``);
* ``GITSRHT_VIEW_LOG``: a file where every worker logs each view it runs and each change of its
  read-only monitor (``integrations.gitsrht.viewlog``: what the drill judges the workers by);
* ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory, the ``metrics`` extra): the service's
  metrics (``srht_readonly.metrics``, service ``git.sr.ht``) at ``/metrics``, every worker's
  added up (``gunicorn_conf`` removes a dead worker's live gauges);
* every ``SRHT_READONLY_*`` variable, as the app config key of the same name (docs/flask.md),
  e.g. ``SRHT_READONLY_REDIS_URL=redis://localhost:6379/0`` for the shared read-only state.

By hand::

    GITSRHT_DATABASE_URL=postgresql://srht@127.0.0.1:PORT/srht \\
        gunicorn --workers 4 --bind 127.0.0.1:5001 -c python:integrations.gitsrht.gunicorn_conf \\
        'integrations.gitsrht.wsgi:app_from_env()'

:class:`Gunicorn` starts and stops such a server from Python (the tests and the drill).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import flask

from srht_readonly.ops.ports import free_port

from . import viewlog
from .web import create_app

__all__ = ["FACTORY", "Gunicorn", "app_from_env"]

#: What gunicorn is told to serve.
FACTORY = "integrations.gitsrht.wsgi:app_from_env()"
ROOT = Path(__file__).resolve().parent.parent.parent


def app_from_env(environ: Mapping[str, str] | None = None) -> flask.Flask:
    """The stand-in app configured from the environment (see the module's doc)."""
    env = os.environ if environ is None else environ
    level = env.get("GITSRHT_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(name)s %(levelname)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("srht_readonly").setLevel(level)
    config: dict[str, Any] = {key: value for key, value in env.items() if key.startswith("SRHT_READONLY_")}
    for key in ("GITSRHT_USER", "GITSRHT_REPOS"):
        if env.get(key):
            config[key] = env[key]
    engine_options: dict[str, Any] = {"connect_args": {"connect_timeout": 5}}
    if env.get("GITSRHT_POOL_SIZE"):
        size = int(env["GITSRHT_POOL_SIZE"])
        engine_options.update(pool_size=size, max_overflow=size)
    app = create_app(env["GITSRHT_DATABASE_URL"], config=config, engine_options=engine_options,
                     read_only=env.get("GITSRHT_READ_ONLY", "1") != "0")
    if env.get("GITSRHT_VIEW_LOG"):
        viewlog.record(app, env["GITSRHT_VIEW_LOG"])
    if env.get("PROMETHEUS_MULTIPROC_DIR"):
        _serve_metrics(app)
    return app


def _serve_metrics(app: flask.Flask) -> None:
    from srht_readonly.flask import metrics_endpoint
    from srht_readonly.metrics import ServiceMetrics

    state = app.extensions.get("srht_readonly")
    metrics = ServiceMetrics("git.sr.ht")
    if state is not None:
        metrics.watch(state.monitor)
    metrics_endpoint(app, "/metrics")


class Gunicorn:
    """A gunicorn master and ``workers`` sync workers serving ``factory`` on a loopback port.

    ``directory`` receives ``gunicorn.log`` (gunicorn's and the app's logs, every worker's) and
    the readiness files. ``env`` adds to the environment (``GITSRHT_DATABASE_URL`` and the
    rest). ``preload``: the app is made once in the master and the workers are forked from it
    (gunicorn ``--preload``; the monitor and the shared state renew their threads and locks in
    each worker); otherwise each worker makes its own, as sr.ht runs. ``nice``: a lower CPU priority
    for the server (the drill, where every service shares the same cores). ``start()`` returns once
    every worker has loaded the app; ``stop()`` asks gunicorn to stop (SIGTERM), then kills what
    is left of its process group. Also a context manager.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        env: Mapping[str, str],
        *,
        workers: int = 4,
        factory: str = FACTORY,
        host: str = "127.0.0.1",
        port: int | None = None,
        graceful: int = 3,
        preload: bool = False,
        nice: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.env = dict(env)
        self.workers = workers
        self.factory = factory
        self.host = host
        self.port = port or free_port(host)
        self.graceful = graceful
        self.preload = preload
        self.nice = nice
        self.url = f"http://{host}:{self.port}"
        self.log_path = self.directory / "gunicorn.log"
        self.ready_dir = self.directory / "gunicorn-ready"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start gunicorn and wait until all its workers are ready; returns the base URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ready_dir.mkdir(exist_ok=True)
        for stale in self.ready_dir.iterdir():
            stale.unlink()
        env = {**os.environ, **self.env, "GITSRHT_READY_DIR": str(self.ready_dir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [
            *(["nice", "-n", str(self.nice)] if self.nice else []),
            sys.executable, "-m", "gunicorn", "--workers", str(self.workers), "--bind", f"{self.host}:{self.port}",
            "--chdir", str(ROOT), "--config", "python:integrations.gitsrht.gunicorn_conf",
            "--pid", str(self.directory / "gunicorn.pid"),
            "--graceful-timeout", str(int(self.graceful)), "--timeout", "60",
            *(["--preload"] if self.preload else []), self.factory,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while len(self.worker_pids()) < self.workers:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gunicorn exited with {self.process.returncode}: {self.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn's workers were not ready in {timeout:g} s: {self.log_tail()}")
                time.sleep(0.05)
            self._wait_answering(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_answering(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/srht-readonly-ready", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer (a 404) means it serves
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn does not answer on {self.url}: {self.log_tail()}") from None
                time.sleep(0.05)

    def worker_pids(self) -> list[int]:
        """The pids of the workers that have loaded the app and not exited."""
        if not self.ready_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.ready_dir.iterdir() if p.name.isdigit())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gunicorn (SIGTERM, then SIGKILL of its process group); safe to call twice."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any (own session)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Gunicorn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

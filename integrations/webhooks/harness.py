"""Real processes for the webhook worker: a private Redis broker, a ``celery worker``, a receiver.

Redis and the worker run on loopback as subprocesses, each in its own process group, and are
stopped (warm shutdown, then SIGKILL of the group) whatever happens; nothing touches the system
Redis. ``WebhookReceiver`` answers 200 to every POST and remembers them. Used by the tests and
by the local drill (``integrations.drill``), which cannot import ``tests/``.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from srht_readonly.ops.ports import free_port

__all__ = ["CeleryWorker", "HarnessError", "RedisServer", "WebhookReceiver", "celery_worker", "redis_server"]

logger = logging.getLogger(__name__)

# The directory holding the ``integrations`` package: the worker imports its app from there.
REPO = Path(__file__).resolve().parents[2]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CELERY = str(Path(sys.executable).parent / "celery")


class HarnessError(RuntimeError):
    """A process of the harness could not be started; the message has the end of its log."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _stop_group(proc: subprocess.Popen[bytes], first: int, timeout: float) -> None:
    """Send ``first`` to ``proc``; SIGKILL its whole process group if it is not gone in time."""
    if proc.poll() is None:
        try:
            proc.send_signal(first)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored signal %d for %.0f s; killing its group", proc.pid, first, timeout)
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # prefork children, if any survived their parent
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d still running after SIGKILL", proc.pid)


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence, files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # another process may take the free port before we bind it
            self.port = free_port()
            log = self.directory / "redis.log"
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                 "--logfile", str(log), "--databases", "4"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
            give_up = time.monotonic() + timeout
            try:
                while time.monotonic() < give_up and self.proc.poll() is None:
                    try:
                        if client.ping():
                            return
                    except redis.RedisError:
                        time.sleep(0.05)
            finally:
                client.close()
            self.stop()
        raise HarnessError(f"redis-server did not start on 127.0.0.1:{self.port}:\n{_tail(log)}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM, 5)


class CeleryWorker:
    """``celery -A app worker`` as a subprocess; its log (``--logfile``) is ``self.logfile``."""

    def __init__(
        self,
        app: str,
        directory: Path,
        *,
        env: dict[str, str],
        name: str = "srht-test",
        queues: str | None = None,
        pool: str = "prefork",
        concurrency: int = 1,
        loglevel: str = "INFO",
    ) -> None:
        self.app = app
        self.directory = Path(directory)
        self.env = env
        self.name = name
        self.queues = queues
        self.pool = pool
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.logfile = self.directory / f"{name}.log"
        self.output = self.directory / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [CELERY, "-A", self.app, "worker", "--pool", self.pool, "--concurrency", str(self.concurrency),
                "--loglevel", self.loglevel, "--logfile", str(self.logfile), "--hostname", f"{self.name}@%h",
                "--without-gossip", "--without-mingle", "--without-heartbeat"]
        if self.queues:
            args += ["--queues", self.queues]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("PYTEST_CURRENT_TEST", None)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                break
            if self.logfile.exists() and " ready." in self.logfile.read_text(errors="replace"):
                return
            time.sleep(0.05)
        self.stop()
        raise HarnessError(
            f"celery worker {self.app} did not become ready:\n{_tail(self.output)}\n{_tail(self.logfile)}"
        )

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM, timeout)

    def lines(self) -> list[str]:
        """Every physical line of the worker's log so far."""
        try:
            return self.logfile.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def lines_about(self, task_id: str) -> list[str]:
        """Log lines that name ``task_id`` (received, retry, succeeded, raised ...)."""
        return [line for line in self.lines() if task_id in line]

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines() if regex.search(line))


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def celery_worker(app: str, directory: Path, **kwargs: object) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(app, directory, **kwargs)  # type: ignore[arg-type]
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


class WebhookReceiver:
    """An HTTP server on loopback that answers 200 to every POST and remembers them."""

    def __init__(self) -> None:
        received: list[dict[str, object]] = []
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                with lock:
                    received.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                     "at": time.monotonic()})
                reply = b"thanks"
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.received = received
        self._lock = lock
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def bodies(self) -> list[str]:
        with self._lock:
            return [str(r["body"]) for r in self.received]

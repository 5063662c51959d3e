"""A meta.sr.ht stand-in: ``GET /api/ssh-key/<b64>`` for the keys it was given.

Answers like meta.sr.ht's legacy API: ``200`` with ``{"id", "key", "fingerprint", "comment",
"owner": {"canonical_name", "name"}}`` for a registered key, ``404`` otherwise. It runs in a
thread of the calling process on a loopback port and remembers every key asked for
(``requests``), so a test can tell a key that was fetched from one that was found locally.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import json
import threading
import urllib.parse
from typing import Any

__all__ = ["MetaServer"]

_PREFIX = "/api/ssh-key/"


class MetaServer:
    """meta.sr.ht's SSH key lookup, on ``127.0.0.1:port`` (a free one by default)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.keys: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        """What ``[meta.sr.ht] origin`` must say."""
        return f"http://{self.host}:{self.port}"

    def add_key(self, public_key: str, *, owner: str) -> dict[str, Any]:
        """Register ``public_key`` (``"type base64 [comment]"``) as ``owner``'s; its record."""
        key_type, b64, *comment = public_key.split()
        digest = hashlib.sha256(base64.b64decode(b64)).digest()
        record = {
            "id": next(self._ids),
            "key": f"{key_type} {b64}",
            "comment": " ".join(comment),
            "fingerprint": "SHA256:" + base64.b64encode(digest).decode().rstrip("="),
            "owner": {"canonical_name": f"~{owner}", "name": owner},
        }
        with self._lock:
            self.keys[b64] = record
        return record

    def asked_for(self, public_key: str) -> int:
        """How many times the pipeline asked about ``public_key``."""
        b64 = public_key.split()[1]
        with self._lock:
            return self.requests.count(b64)

    def _lookup(self, b64: str) -> dict[str, Any] | None:
        with self._lock:
            self.requests.append(b64)
            return self.keys.get(b64)

    def start(self) -> None:
        """Listen and serve in a daemon thread."""
        meta = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if not self.path.startswith(_PREFIX):
                    self._answer(404, {"errors": [{"reason": "not found"}]})
                    return
                b64 = urllib.parse.unquote(self.path[len(_PREFIX):])
                record = meta._lookup(b64)
                if record is None:
                    self._answer(404, {"errors": [{"reason": "no such key"}]})
                else:
                    self._answer(200, record)

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep the test output clean; ``requests`` records what matters

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="meta.sr.ht",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> MetaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

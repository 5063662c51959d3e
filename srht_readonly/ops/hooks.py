"""The event hook: inventory ``[hooks] command = ...`` run at each procedure step, a JSON event on stdin.

For status pages and chat. Each event is one JSON object (one line) on the command's stdin::

    {"event": "step", "command": "switchover --to konpaku", "message": "PAUSE sent ...",
     "time": "2026-11-30T17:00:00.123+00:00", "inventory": "/etc/sr.ht/readonly.ini", "seq": 3}

``event`` is ``start`` (the plan was accepted: ``steps`` lists it), ``step`` (a progress line of
the procedure), ``done`` (``result`` is the text the command prints) or ``failed`` (``exit`` and
``error``). The command runs with ``sh -c`` on the machine running ``srht-readonly``, once per
event, in order, in a thread of its own: a slow or failing hook never delays or fails a
procedure (a write pause included). Each run is bounded by ``TIMEOUT`` seconds; failures are
logged (WARNING), never raised. ``close()`` waits up to ``DRAIN`` seconds for events still queued.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

TIMEOUT = 10.0
DRAIN = 15.0


class Hooks:
    """Runs ``command`` for each event, in order, off the caller's thread (None: does nothing)."""

    def __init__(self, command: str | None, *, command_name: str, inventory: str) -> None:
        self.command = command
        self.command_name = command_name
        self.inventory = inventory
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if command:
            self._thread = threading.Thread(target=self._run, name="srht-readonly-hooks", daemon=True)
            self._thread.start()

    def emit(self, event: str, **fields: Any) -> None:
        """Queue one event; returns at once."""
        if self._thread is None:
            return
        with self._seq_lock:  # in order of seq, whichever thread reports
            self._seq += 1
            self._queue.put({"event": event, "command": self.command_name, "seq": self._seq,
                             "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                             "inventory": self.inventory, **fields})

    def close(self, timeout: float = DRAIN) -> None:
        """Let the queued events run (at most ``timeout`` seconds), then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("event hook still running after %.0f s; later events are dropped", timeout)
        self._thread = None

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            started = time.monotonic()
            try:
                proc = subprocess.run(["sh", "-c", self.command or ""], input=json.dumps(event) + "\n", text=True,
                                      capture_output=True, timeout=TIMEOUT)
                if proc.returncode != 0:
                    logger.warning("event hook exited %d on %s event: %s", proc.returncode, event["event"],
                                   (proc.stderr or proc.stdout).strip()[:500])
            except (OSError, subprocess.TimeoutExpired) as exc:
                logger.warning("event hook failed on %s event: %s", event["event"], exc)
            logger.debug("event hook ran for %s in %.3f s", event["event"], time.monotonic() - started)

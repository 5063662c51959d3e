"""Watch every process's command line on this machine (both ends of every ssh connection) for a secret."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


class ArgvWatcher:
    """Scans ``/proc/*/cmdline`` in a loop while inside; ``seen`` lists the command lines holding ``secret``.

    On entry it proves it can see: a process started with the secret in its argv must be caught,
    or the watch fails (a watcher that sees nothing would pass anything).
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.seen: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        needle = self.secret.encode()
        while not self._stop.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if needle in cmdline:
                    self.seen.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
            self.scans += 1

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        canary = subprocess.Popen(["sh", "-c", "sleep 0.5", "canary", self.secret])
        canary.wait()
        deadline = time.monotonic() + 5
        while not self.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.seen and "canary" in self.seen[0], "the watcher did not see a command line it should have"
        self.seen.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

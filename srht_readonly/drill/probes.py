"""Traffic sources for a real deployment: the probes of ``[probe NAME]`` (see ``config``).

Each probe runs in its own thread every ``every`` seconds and records what a user would have
seen. An HTTP request: 2xx is ok; a 503 carrying ``Srht-Read-Only: true`` (what
``srht_readonly.flask`` sends while the database is read-only, and only then) or, for services
without it, a 503 whose body matches ``explained``, is the explained refusal. A shell command:
exit 0 is ok, or dropped when its output matches ``dropped``; a failure whose output matches
``explained`` is the explained refusal. Anything else, including a probe that could not run,
is an error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from . import verdicts
from .config import ProbeSpec
from .recorder import Outcome, Recorder, State
from .scenarios import Expectation


class ProbeSource:
    """One ``[probe NAME]`` as a ``TrafficSource``."""

    def __init__(self, spec: ProbeSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.op = spec.method if spec.url else "command"
        self.kinds = (self.op,)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, recorder: Recorder) -> None:
        self._stop = threading.Event()  # a thread that overran the last stop() keeps its own, set, event
        self._thread = threading.Thread(target=self._loop, args=(recorder, self._stop), daemon=True,
                                        name=f"probe-{self.name}")
        self._thread.start()

    def stop(self) -> None:
        """Ask the probe to end; the runner waits for what is in flight and judges it."""
        self._stop.set()

    def expectations(self, scenario: str, recorder: Recorder, facts: dict[str, Any]) -> list[Expectation]:
        return verdicts.common(self.name, scenario, verdicts.of_service(recorder.events, self.name), facts,
                                kinds=self.kinds)

    def _loop(self, recorder: Recorder, stop: threading.Event) -> None:
        while not stop.is_set():
            operation = recorder.begin(self.name, self.op, write=self.spec.write)
            try:
                outcome, detail = self.try_once()
            except Exception as exc:  # the probe could not run: the user would have seen nothing work
                outcome, detail = Outcome.ERROR, f"{type(exc).__name__}: {exc}"
            # A refusal with the explanation, or a drop the probe recognised, shows the read-only state.
            met = State.READ_ONLY if outcome in (Outcome.EXPLAINED, Outcome.DROPPED) else None
            recorder.end(operation, outcome, detail=detail, met=met)
            stop.wait(max(0.0, self.spec.every - (time.monotonic() - operation.started)))

    def try_once(self) -> tuple[Outcome, str]:
        """Run the probe once: its outcome and what the user saw (short)."""
        return self._http() if self.spec.url else self._command()

    def _http(self) -> tuple[Outcome, str]:
        spec = self.spec
        assert spec.url is not None
        body = spec.data.encode() if spec.data is not None else None
        request = urllib.request.Request(spec.url, data=body, method=spec.method)
        try:
            with urllib.request.urlopen(request, timeout=spec.timeout) as response:
                return Outcome.OK, f"{response.status}"
        except urllib.error.HTTPError as exc:
            text = exc.read(4096).decode(errors="replace")
            header = exc.headers.get("Srht-Read-Only")
            explained = header == "true" if header is not None else bool(spec.explained.search(text))
            if exc.code == 503 and explained:
                return Outcome.EXPLAINED, "503 read-only"
            return Outcome.ERROR, f"{exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            return Outcome.ERROR, f"{type(exc).__name__}: {exc}"

    def _command(self) -> tuple[Outcome, str]:
        spec = self.spec
        assert spec.command is not None
        # Its own process group, so that a timeout kills the whole pipeline (a hung ssh too), not just sh.
        proc = subprocess.Popen(spec.command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome.ERROR, f"no answer in {spec.timeout:g} s"
        output = (stdout + stderr).strip()
        last = output.splitlines()[-1] if output else ""
        if proc.returncode == 0:
            if spec.dropped is not None and spec.dropped.search(output):
                return Outcome.DROPPED, last
            return Outcome.OK, "exit 0"
        if spec.explained.search(output):
            return Outcome.EXPLAINED, last
        return Outcome.ERROR, f"exit {proc.returncode}: {last}"

"""The drill's live progress on stderr, and its closing summary table.

On a terminal one status line is redrawn twice a second (scenario, elapsed time, last step,
outcomes per service); elsewhere (CI, a pipe) each step is printed once as it happens.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

from .recorder import Recorder


class LiveDisplay:
    """Follows the recorder of the running scenario; call ``follow``/``stop`` around each."""

    def __init__(self, stream: IO[str] | None = None, *, interval: float = 0.5) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self._recorder: Recorder | None = None
        self._name = ""
        self._seen_marks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str, recorder: Recorder | None) -> None:
        """The runner's progress callback."""
        if recorder is None:
            self._finish_line()
            self._print(f"== {message}")
            return
        self._recorder, self._name, self._seen_marks = recorder, message.split(":")[0], 0
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="drill-live")
            self._thread.start()

    def say(self, message: str) -> None:
        """A line of its own, outside any scenario (setting up, tearing down)."""
        self._finish_line()
        self._print(f"... {message}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._tick()
        self._finish_line()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def _tick(self) -> None:
        rec = self._recorder
        if rec is None:
            return
        marks = rec.marks
        for m in marks[self._seen_marks:]:
            self._finish_line()
            self._print(f"   {m.t:6.2f} s  {m.label}")
        self._seen_marks = len(marks)
        if self.tty:
            counts = " | ".join(
                f"{svc} " + " ".join(f"{k} {v}" for k, v in sorted(c.items()))
                for svc, c in sorted(rec.counts().items()))
            line = f"   [{self._name} {rec.now():5.1f} s] {counts}"
            self.stream.write("\r\033[K" + line[:200])
            self.stream.flush()

    def _finish_line(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def summary_table(report: dict[str, Any]) -> str:
    """One row per scenario: verdict, write gap, lost writes, what users saw."""
    head = f"{'scenario':<20} {'result':<7} {'write gap':>9} {'lost':>5} {'errors':>7} {'explained':>9} " \
           f"{'dropped':>8} {'time':>6}"
    rows = [head, "-" * len(head)]
    for s in report["scenarios"]:
        total = {k: sum(c.get(k, 0) for c in s["services"].values()) for k in ("error", "explained", "dropped")}
        rows.append(
            f"{s['name']:<20} {'PASS' if s['passed'] else 'FAIL':<7} {s['write_unavailability']:>7.2f} s "
            f"{s['ledger']['lost']:>5} {total['error']:>7} {total['explained']:>9} {total['dropped']:>8} "
            f"{s['seconds']:>5.0f}s")
        rows += [f"    x {e['text']} (observed: {e['observed']})" for e in s["expectations"] if not e["passed"]]
    return "\n".join(rows)

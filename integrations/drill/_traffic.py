"""The threads every traffic source runs: a loop of user operations from ``start`` to ``stop``.

A source subclasses :class:`Traffic`, sets ``name`` and implements ``step(worker)``: one user
operation (or one round of them) that records what the user saw. ``start(recorder)`` runs
``threads`` loops with ``pause`` seconds between steps; ``stop()`` asks them to end and waits at
most ``STOP_WAIT`` seconds, so the drill's clock is not held by a slow ``git push`` (a loop still
busy then finishes its operation on its own and records it into its own scenario's
recorder, which nobody reads any more). ``close()`` waits for them for good.
"""

from __future__ import annotations

import logging
import threading
import time

from srht_readonly.drill import Outcome, Recorder

logger = logging.getLogger(__name__)

#: Seconds ``stop()`` waits for the loops (the runner stops every source in turn).
STOP_WAIT = 1.5
#: Seconds ``close()`` waits for them.
CLOSE_WAIT = 60.0


class Traffic:
    """Loops of one service's user operations; subclasses implement ``step``."""

    name = "service"

    def __init__(self, *, threads: int, pause: float) -> None:
        self.threads = threads
        self.pause = pause
        self.recorder = Recorder()
        self._stopping = threading.Event()
        self._loops: list[threading.Thread] = []
        self._local = threading.local()  # the recorder of the scenario a loop was started for

    def start(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._stopping = threading.Event()  # a loop left over from the last scenario keeps its own
        self._loops = [threading.Thread(target=self._loop, args=(i, recorder, self._stopping), daemon=True,
                                        name=f"drill-{self.name}-{i}") for i in range(self.threads)]
        for t in self._loops:
            t.start()

    def stop(self) -> None:
        self._stopping.set()
        self.join(self._loops, STOP_WAIT)

    def close(self) -> None:
        """Stop and wait for every loop (and whatever ``_threads_to_close`` names) to end."""
        self._stopping.set()
        self.join([*self._loops, *self._threads_to_close()], CLOSE_WAIT)

    def _threads_to_close(self) -> list[threading.Thread]:
        return []

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def join(self, threads: list[threading.Thread], timeout: float) -> None:
        give_up = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, give_up - time.monotonic()))
        busy = [t.name for t in threads if t.is_alive()]
        if busy:
            logger.info("%s: %d operation(s) still running after %.1f s: %s", self.name, len(busy), timeout,
                        ", ".join(busy))

    def _loop(self, worker: int, recorder: Recorder, stopping: threading.Event) -> None:
        self._local.recorder = recorder
        while not stopping.is_set():
            started = time.monotonic()
            try:
                self.step(worker)
            except Exception as exc:  # a failure of the drill's own client is still something that happened
                logger.exception("%s traffic", self.name)
                self.record("traffic", Outcome.ERROR, started, detail=f"drill client failed: {exc!r}")
            stopping.wait(self.pause)

    def step(self, worker: int) -> None:
        raise NotImplementedError

    def record(self, op: str, outcome: Outcome, started: float, *, write: bool = False, detail: str = "") -> None:
        recorder = getattr(self._local, "recorder", self.recorder)
        recorder.record(self.name, op, outcome, started=started, write=write, detail=detail)
